"""`fastrobust train <method>`: each method's options and runner (the methods are listed in
`fastrobust.trainers.registry`), and what every run shares: its config from the flags (or the
checkpoint's on --resume), one-line errors, Ctrl-C and the final evaluation."""
from __future__ import annotations

import os
import shlex
import sys
import time

import torch

from ..data import DataCorrupt, DataMissing
from ..trainers.afa import AFAConfig, AFATrainer, evaluate_afa, report_afa
from ..trainers.awnet import AWNetConfig, AWNetTrainer, evaluate_awnet, report_awnet
from ..trainers.base import TrainingDiverged, distributed_context
from ..trainers.checkpoints import (RESUME_FREE, CheckpointError, load_checkpoint,
                                    resume_changes, resumed_config, unknown_options)
from ..trainers.config import ConfigError
from ..trainers.oat import OATConfig, OATTrainer, report, sweep_all
from .console import bars, close_bars, flag


def _config(cls, args, tuples=()):
    """The run's config from the options that were given, validated before any data is read
    or model built; with --resume, the checkpoint's run with those options applied (a
    differing one needs --override). Bad values end here with one line naming the flag."""
    p = args.parser
    kw = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None}
    for key in tuples:
        if key in kw:
            kw[key] = tuple(kw[key])
    given = set(kw)
    cfg = cls(**kw)
    path = None
    try:
        cfg.validate()
        if not getattr(args, "resume", False):
            return cfg
        path = os.path.join(cfg.out, "last.pt")
        ck = load_checkpoint(path, kind=args.kinds)
        ignored = unknown_options(cls, ck["config"], path)
        if ignored:
            print(f"{p.prog}: warning: {ignored}", file=sys.stderr)
        changes = resume_changes(ck["config"], cfg, given)
        if changes and not args.override:
            said = ", ".join(f"{flag(p, k)} {new!r} (the run has {old!r})"
                             for k, (old, new) in changes.items())
            p.error(f"--resume: {said} differs from the run in {path}; pass --override to "
                    "apply it to the rest of the run")
        cfg = resumed_config(cls, ck["config"], cfg, given)
        cfg.validate()
        return cfg
    except ConfigError as e:
        if path is not None and e.field not in given:  # the run's own value is refused
            how = "" if e.field in RESUME_FREE else " with --override"
            p.error(f"{flag(p, e.field)} {e.message} in the run's configuration ({path}); "
                    f"give {flag(p, e.field)}{how} to change it")
        p.error(f"{flag(p, e.field)} {e.message}")
    except CheckpointError as e:
        p.error(f"--resume: {e}")


def _oat_config(args):
    return _config(OATConfig, args, ("lambdas", "eval_unseen", "widths"))


def _train(args, cfg, make, describe: str, resumed, evaluate) -> int:
    """What every train subcommand does: under torchrun only rank 0 speaks, checkpoints and
    evaluates; a diverged run exits with status 2."""
    started = time.time()
    rank, world, _ = distributed_context(cfg.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    ranks = f"; {world} ranks (DDP, global batch {cfg.batch_size})" if world > 1 else ""
    say(describe + ranks)
    try:
        trainer = make(say)
        if args.resume:
            say(resumed(trainer))
            if trainer.resumed_changes:
                say("  changed for the rest of the run: " + ", ".join(
                    f"{k} {old!r} -> {new!r}"
                    for k, (old, new) in trainer.resumed_changes.items()))
        trainer.fit(log=say)
    except TrainingDiverged as e:
        say(f"{args.parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DataMissing, DataCorrupt) as e:
        print(f"{args.parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say(_interrupted(args, cfg, started), file=sys.stderr)
        return 130
    except RuntimeError as e:
        return _refused_by_deterministic(args, cfg, e)
    try:
        if trainer.is_main:
            evaluate(trainer)
    except KeyboardInterrupt:
        say(_interrupted(args, cfg, started), file=sys.stderr)
        return 130
    except RuntimeError as e:
        return _refused_by_deterministic(args, cfg, e)
    trainer.close()
    return 0


def _refused_by_deterministic(args, cfg, e: RuntimeError) -> int:
    """torch refused an op that has no deterministic kernel on this device (--deterministic):
    one line naming it and the flag; any other error goes on up."""
    if not (getattr(cfg, "deterministic", False) and "deterministic implementation" in str(e)):
        raise e
    why = str(e).strip().splitlines()[0].split(", but you set")[0]
    print(f"{args.parser.prog}: error: --deterministic: {why} on {cfg.device} in torch "
          f"{torch.__version__}; run without --deterministic", file=sys.stderr)
    return 2


def _interrupted(args, cfg, started: float) -> str:
    """The one line of a Ctrl-C during a run: its last checkpoint and how to go on from it."""
    close_bars()
    prog, path = args.parser.prog, os.path.join(cfg.out, "last.pt")
    if os.path.isfile(path) and (args.resume or os.path.getmtime(path) >= started):
        return (f"{prog}: interrupted; the last checkpoint is {path}: continue with "
                f"`{prog} --out {shlex.quote(cfg.out)} --resume`")
    if os.path.isfile(path):
        return (f"{prog}: interrupted before this run wrote a checkpoint ({path} is still "
                "an earlier run's)")
    return f"{prog}: interrupted before this run wrote a checkpoint; nothing to resume"


def train_oat(args) -> int:
    cfg = _oat_config(args)
    widths = f", widths {list(cfg.widths)}" if cfg.widths else ""

    def evaluate(trainer):
        rows = sweep_all(trainer.model.eval(), trainer.data.test, cfg, progress=bars())
        report(rows, cfg, cfg.out, f"{cfg.method.upper()} {cfg.arch} on {cfg.dataset}")
    return _train(
        args, cfg, lambda say: OATTrainer(cfg, resume=args.resume, progress=bars()),
        f"{cfg.method.upper()} on {cfg.dataset}: {cfg.arch}{widths}, {cfg.epochs} epochs, "
        f"PGD-{cfg.steps} (eps {cfg.eps:.4g}, alpha {cfg.step_size():.4g}), lambdas "
        f"{list(cfg.lambdas)}{' (continuous)' if cfg.continuous else f' ({cfg.sampling})'}, "
        f"{cfg.variant} model; checkpoints in "
        f"{cfg.out}", lambda t: f"resumed after epoch {t.epoch}", evaluate)


def train_afa(args) -> int:
    cfg = _config(AFAConfig, args)
    eps = ", ".join(f"{e:.4g}" for e in cfg.strengths().tolist())

    def evaluate(trainer):
        result = evaluate_afa(trainer.model, trainer.data.test, cfg, progress=bars())
        report_afa(result, cfg, cfg.out, f"AFA ResNet-18/w{cfg.width} on {cfg.dataset}")
    return _train(
        args, cfg, lambda say: AFATrainer(cfg, resume=args.resume, progress=bars()),
        f"AFA on {cfg.dataset}: ResNet-18 of width {cfg.width}, K={cfg.num_branches} "
        f"strengths [{eps}], stage I {cfg.epochs} epochs ({cfg.schedule}, "
        f"{cfg.adv_loss.upper()}-AT, PGD-{cfg.steps}), stage II {cfg.epochs2} epochs; "
        f"checkpoints in {cfg.out}",
        lambda t: f"resumed after stage-I epoch {t.epoch1}, stage-II epoch {t.epoch2}",
        evaluate)


def train_awnet(args) -> int:
    cfg = _config(AWNetConfig, args)
    teachers = (f"teachers {cfg.teacher_nat}, {cfg.teacher_adv}" if cfg.teacher_nat and
                cfg.teacher_adv else f"teachers trained here ({cfg.teacher_epochs} epochs)")

    def evaluate(trainer):
        result = evaluate_awnet(trainer.model, trainer.data.test, cfg, progress=bars(),
                                baselines={"PGD-AT teacher": trainer.teacher_adv,
                                           "standard teacher": trainer.teacher_nat})
        report_awnet(result, cfg, cfg.out, f"AW-Net ResNet-18/w{cfg.width} on {cfg.dataset}")
    return _train(
        args, cfg, lambda say: AWNetTrainer(cfg, resume=args.resume, log=say,
                                            progress=bars()),
        f"AW-Net on {cfg.dataset}: ResNet-18 of width {cfg.width}, {cfg.epochs} epochs, "
        f"PGD-{cfg.steps} (eps {cfg.eps:.4g}), tau {cfg.tau:g}, beta {cfg.beta:g}; {teachers}; "
        f"checkpoints in {cfg.out}", lambda t: f"resumed after epoch {t.epoch}", evaluate)


def _add_common_options(p, d, eval_what: str):
    """The options every trainer shares (``d``: its config's defaults)."""
    p.add_argument("--dataset", choices=("digits", "cifar10", "svhn"),
                   help=f"data set (default {d.dataset}: embedded, no download)")
    p.add_argument("--data-root", dest="data_root", help="directory with the data set's files")
    p.add_argument("--width", type=int, help=f"ResNet base width (default {d.width})")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help=f"global batch (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"default {d.default_text('lr')}")
    p.add_argument("--steps", type=int, help=f"PGD steps in training (default {d.steps})")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--out", help=f"run directory (default {d.out})")
    p.add_argument("--eval-steps", dest="eval_steps", type=int,
                   help=f"PGD steps of {eval_what} (default {d.eval_steps})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out>/last.pt with its configuration; a larger "
                   "--epochs extends it (the schedule keeps decaying to the new end)")
    p.add_argument("--override", action="store_true",
                   help="with --resume: apply the options given here that differ from the "
                   "run's (e.g. --lr, --eps) to the rest of the run; recorded in the checkpoint")
    p.add_argument("--no-random-start", dest="random_start", action="store_false",
                   default=None, help="PGD starts from the clean input")
    p.add_argument("--no-sync-bn", dest="sync_bn", action="store_false", default=None,
                   help="under torchrun: per-rank BN statistics instead of the global batch's")
    p.add_argument("--max-train-batches", dest="max_train_batches", type=int,
                   help="stop each epoch after that many batches (smoke runs)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch's deterministic algorithms (torch.use_deterministic_algorithms; "
                   "on CUDA also cuDNN and cuBLAS settings): a seeded run gives the same "
                   "weights, bit for bit, on every run with the same device, thread count and "
                   "versions. On the CPU the default is already reproducible")
    p.add_argument("--memory-format", dest="memory_format",
                   choices=("auto", "channels_last", "contiguous"),
                   help="layout of the model and batches (default auto: channels_last on the "
                   "CPU unless a torch CPU bug could hit the model's 1x1 stride-2 convolutions)")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="training forward passes and attacks in fp32 (default) or under bf16 "
                   "autocast (parameters, optimizer and BN statistics stay fp32)")


def add_oats_options(p):
    add_oat_options(p)
    p.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                   help="width multipliers (default 0.5 0.75 1.0)")


def add_awnet_options(p):
    d = AWNetConfig()
    _add_common_options(p, d, "the evaluation")
    p.add_argument("--teacher-epochs", dest="teacher_epochs", type=int,
                   help=f"epochs of the teachers trained here (default {d.teacher_epochs})")
    p.add_argument("--teacher-nat", dest="teacher_nat",
                   help="natural teacher: an nn.Module saved with torch.save (a fastrobust "
                   "ResNet: its backbone is also the detector's feature extractor)")
    p.add_argument("--teacher-adv", dest="teacher_adv", help="adversarial teacher (nn.Module)")
    p.add_argument("--eps", type=float, help=f"attack radius (default {d.default_text('eps')})")
    p.add_argument("--alpha", type=float, help="attack step (default eps/4)")
    p.add_argument("--single-bn", dest="mix_bn", action="store_false", default=None,
                   help="one BN instead of MixBN (the ablation of the paper's Table 3)")
    p.add_argument("--tau", type=float, help=f"distillation temperature (default {d.tau})")
    p.add_argument("--beta", type=float, help=f"signal exponent (default {d.beta})")


def add_afa_options(p):
    d = AFAConfig()
    _add_common_options(p, d, "the evaluation")
    p.add_argument("--epochs2", type=int, help=f"stage-II epochs (default {d.epochs2})")
    p.add_argument("--lr2", type=float,
                   help=f"stage-II learning rate (default {d.default_text('lr2')})")
    p.add_argument("--branches", dest="num_branches", type=int,
                   help=f"K attack strengths, 0..max-eps (default {d.num_branches})")
    p.add_argument("--max-eps", dest="max_eps", type=float,
                   help=f"strongest ε (default {d.default_text('max_eps')})")
    p.add_argument("--adv-loss", dest="adv_loss", choices=("pgd", "trades"),
                   help="adversarial loss (default pgd: PGD-AT)")
    p.add_argument("--trades-beta", dest="trades_beta", type=float,
                   help=f"default {d.trades_beta}")
    p.add_argument("--schedule", choices=("batched", "sequential"),
                   help="stage I: one batched attack and pass (default) or the paper's "
                   "sequential K passes")


def add_oat_options(p):
    d = OATConfig()
    _add_common_options(p, d, "the final lambda sweep")
    p.add_argument("--arch", choices=("resnet18", "resnet34", "wrn"),
                   help=f"model (default {d.arch})")
    p.add_argument("--depth", type=int, help=f"Wide-ResNet depth (default {d.depth})")
    p.add_argument("--widen", type=int, help=f"Wide-ResNet widening (default {d.widen})")
    p.add_argument("--weight-decay", dest="weight_decay", type=float,
                   help=f"default {d.weight_decay}")
    p.add_argument("--eps", type=float, help="attack radius (default 8/255)")
    p.add_argument("--alpha", type=float, help="attack step (default: the OAT repository's "
                   "min(1.25 eps, eps + 4/255) / steps)")
    p.add_argument("--lambdas", type=float, nargs="+", help=f"default {list(d.lambdas)}")
    p.add_argument("--continuous", action="store_true", default=None,
                   help="sample lambda from U(0, 1) instead of the set")
    p.add_argument("--sampling", choices=("official", "iid"),
                   help="lambda per batch: official (the OAT repository's: ceil(B/|S|) zeros "
                   "first, the rest uniform over the non-zero values; default) or iid "
                   "(uniform over the set per sample)")
    p.add_argument("--variant", choices=("official", "identity"),
                   help="model: official (the repository's FiLM activation and init, a FiLM "
                   "after the stem BN; default) or identity (identity-initialised raw FiLM, "
                   "none at the stem)")
    p.add_argument("--attack-loss", dest="attack_loss", choices=("ce_sum", "ce"),
                   help="PGD's loss: the summed cross-entropy (the repository's; default) or "
                   "its mean")
    p.add_argument("--encoding", choices=("ro", "dct", "none"), help="lambda encoding")
    p.add_argument("--dim", type=int, help=f"encoding dimension (default {d.dim})")
    p.add_argument("--single-bn", dest="dual_bn", action="store_false", default=None,
                   help="one shared BN instead of dual BN (the ablation)")
