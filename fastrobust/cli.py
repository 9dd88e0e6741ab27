"""The `fastrobust` command line.

    fastrobust demo                 OAT on the embedded digits data beside dedicated models at
                                    λ = 0 and 1, then the λ table and plot
    fastrobust train oat [...]      train OAT (options: fastrobust train oat --help)
    fastrobust train oats [...]     train OATS (OAT with slimmable widths)
    fastrobust eval RUN/last.pt     λ sweep of a trained checkpoint: SA, RA, JSON, plot
    fastrobust eval --from-oat-repo latest.pth --encoding-matrix rand_otho_mat.npy
                                    the same for a checkpoint of the OAT repository
    fastrobust info                 versions, and the backend serving each op
    fastrobust speed                dual BN against the OAT-style eager form, timed
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import torch


def info(_args=None) -> int:
    import fastrobust
    from fastrobust import backends

    why = backends.triton.missing()
    if why is None:
        import triton
        triton_version = triton.__version__
    else:
        triton_version = f"unavailable: {why}"
    print(f"fastrobust {fastrobust.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version}, {torch.get_num_threads()} CPU threads, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print("\nbackends (op, device -> chosen; why not the others):")
    print(backends.describe())
    return 0


def _speed(args) -> int:
    from fastrobust._speed import speed

    info()
    return speed(args)


def _bars() -> bool:
    """Progress bars on a terminal only: a log file or pipe gets the epoch lines, not every
    redraw of a bar."""
    return sys.stderr is not None and sys.stderr.isatty()


def _close_bars() -> None:
    """Closes the progress bars a Ctrl-C left open, so its line starts a clean line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastrobust train oat: error: --eps must be ...``,
    exit status 2, no usage block and no traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(parser, field: str) -> str:
    """The option that sets config field ``field`` (``--batch-size`` for batch_size)."""
    for action in parser._actions:
        if action.dest == field and action.option_strings:
            return action.option_strings[0]
    return field


def _config(cls, args, tuples=()):
    """The run's config from the options that were given, validated before any data is read
    or model built; with --resume, the checkpoint's run with those options applied (a
    differing one needs --override). Bad values end here with one line naming the flag."""
    from fastrobust.trainers.common import (RESUME_FREE, CheckpointError, ConfigError,
                                            load_checkpoint, resume_changes, resumed_config,
                                            unknown_options)

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
            said = ", ".join(f"{_flag(p, k)} {new!r} (the run has {old!r})"
                             for k, (old, new) in changes.items())
            p.error(f"--resume: {said} differs from the run in {path}; pass --override to "
                    "apply it to the rest of the run")
        cfg = resumed_config(cls, ck["config"], cfg, given)
        cfg.validate()
        return cfg
    except ConfigError as e:
        if path is not None and e.field not in given:  # the run's own value is refused
            how = "" if e.field in RESUME_FREE else " with --override"
            p.error(f"{_flag(p, e.field)} {e.message} in the run's configuration ({path}); "
                    f"give {_flag(p, e.field)}{how} to change it")
        p.error(f"{_flag(p, e.field)} {e.message}")
    except CheckpointError as e:
        p.error(f"--resume: {e}")


def _oat_config(args):
    from fastrobust.trainers.oat import OATConfig

    return _config(OATConfig, args, ("lambdas", "eval_unseen", "widths"))


def _train(args, cfg, make, describe: str, resumed, evaluate) -> int:
    """What every train subcommand does: under torchrun only rank 0 speaks, checkpoints and
    evaluates; a diverged run exits with status 2."""
    from fastrobust.trainers.common import TrainingDiverged, distributed_context

    started = time.time()
    rank, world, _ = distributed_context(cfg.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    ranks = f"; {world} ranks (DDP, global batch {cfg.batch_size})" if world > 1 else ""
    say(describe + ranks)
    from fastrobust.data import DataCorrupt, DataMissing
    from fastrobust.trainers.common import CheckpointError

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
    _close_bars()
    prog, path = args.parser.prog, os.path.join(cfg.out, "last.pt")
    if os.path.isfile(path) and (args.resume or os.path.getmtime(path) >= started):
        return (f"{prog}: interrupted; the last checkpoint is {path}: continue with "
                f"`{prog} --out {shlex.quote(cfg.out)} --resume`")
    if os.path.isfile(path):
        return (f"{prog}: interrupted before this run wrote a checkpoint ({path} is still "
                "an earlier run's)")
    return f"{prog}: interrupted before this run wrote a checkpoint; nothing to resume"


def train(args) -> int:
    from fastrobust.trainers.oat import OATTrainer, report, sweep_all

    cfg = _oat_config(args)
    widths = f", widths {list(cfg.widths)}" if cfg.widths else ""

    def evaluate(trainer):
        rows = sweep_all(trainer.model.eval(), trainer.data.test, cfg, progress=_bars())
        report(rows, cfg, cfg.out, f"{cfg.method.upper()} {cfg.arch} on {cfg.dataset}")
    return _train(
        args, cfg, lambda say: OATTrainer(cfg, resume=args.resume, progress=_bars()),
        f"{cfg.method.upper()} on {cfg.dataset}: {cfg.arch}{widths}, {cfg.epochs} epochs, "
        f"PGD-{cfg.steps} (eps {cfg.eps:.4g}, alpha {cfg.step_size():.4g}), lambdas "
        f"{list(cfg.lambdas)}{' (continuous)' if cfg.continuous else f' ({cfg.sampling})'}, "
        f"{cfg.variant} model; checkpoints in "
        f"{cfg.out}", lambda t: f"resumed after epoch {t.epoch}", evaluate)


def evaluate_checkpoint(args) -> int:
    from fastrobust.trainers.oat import model_from_checkpoint, report, sweep_all

    from fastrobust.data import DataCorrupt, DataMissing
    from fastrobust.trainers.common import CheckpointError, ConfigError, check_device

    p = args.parser
    if args.steps is not None and args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    if args.from_oat_repo is not None:
        if args.checkpoint is not None:
            p.error(f"give either CHECKPOINT ({args.checkpoint}) or --from-oat-repo, not both")
        from fastrobust._oat_repo_cli import evaluate_oat_repo

        return evaluate_oat_repo(args, report_progress=_bars())
    repo_only = [f for f in ("encoding_matrix", "arch", "lambda_choices", "dataset",
                             "data_root", "eps") if getattr(args, f) is not None]
    if repo_only:
        p.error(f"{_flag(p, repo_only[0])} goes with --from-oat-repo")
    if args.checkpoint is None:
        p.error("give a CHECKPOINT (or --from-oat-repo CKPT --encoding-matrix NPY)")
    if args.lambdas is not None and not all(0 <= v <= 1 for v in args.lambdas):
        p.error(f"--lambdas must lie in [0, 1], got {args.lambdas}")
    path = args.checkpoint
    if os.path.isdir(path):  # a run directory: its last checkpoint
        if not os.path.isfile(os.path.join(path, "last.pt")):
            found = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
            there = f"it holds {', '.join(found)}" if found else "it holds no .pt file"
            p.error(f"{path} is a directory without a last.pt ({there}); give the "
                    "checkpoint file")
        path = os.path.join(path, "last.pt")
    try:
        check_device(args.device)
        model, cfg, ds = model_from_checkpoint(
            path, args.device,
            warn=lambda message: print(f"{p.prog}: warning: {message}", file=sys.stderr))
    except ConfigError as e:
        p.error(f"--{e.field} {e.message}")
    except (CheckpointError, DataMissing, DataCorrupt) as e:
        p.error(str(e))
    if args.steps is not None:
        cfg.eval_steps = args.steps
    rows = sweep_all(model, ds.test, cfg, lambdas=args.lambdas, steps=cfg.eval_steps,
                     progress=_bars())
    out = args.out or os.path.dirname(os.path.abspath(path))
    report(rows, cfg, out, f"{cfg.method.upper()} {cfg.arch} on {cfg.dataset} ({path})")
    return 0


def demo(args) -> int:
    from fastrobust.demo import run_demo
    from fastrobust.trainers.common import ConfigError
    from fastrobust.trainers.oat import OATConfig

    cfg = OATConfig(dataset="digits", arch="resnet18", width=args.width, epochs=args.epochs,
                    batch_size=64, lr=0.05, eps=args.eps, steps=7, out=args.out,
                    seed=args.seed, eval_steps=7)
    try:
        cfg.validate()
    except ConfigError as e:
        args.parser.error(f"{_flag(args.parser, e.field)} {e.message}")
    info()
    return run_demo(cfg, dedicated=args.dedicated, progress=_bars())


def train_afa(args) -> int:
    from fastrobust.trainers.afa import AFAConfig, AFATrainer, evaluate_afa, report_afa

    cfg = _config(AFAConfig, args)
    eps = ", ".join(f"{e:.4g}" for e in cfg.strengths().tolist())

    def evaluate(trainer):
        result = evaluate_afa(trainer.model, trainer.data.test, cfg, progress=_bars())
        report_afa(result, cfg, cfg.out, f"AFA ResNet-18/w{cfg.width} on {cfg.dataset}")
    return _train(
        args, cfg, lambda say: AFATrainer(cfg, resume=args.resume, progress=_bars()),
        f"AFA on {cfg.dataset}: ResNet-18 of width {cfg.width}, K={cfg.num_branches} "
        f"strengths [{eps}], stage I {cfg.epochs} epochs ({cfg.schedule}, "
        f"{cfg.adv_loss.upper()}-AT, PGD-{cfg.steps}), stage II {cfg.epochs2} epochs; "
        f"checkpoints in {cfg.out}",
        lambda t: f"resumed after stage-I epoch {t.epoch1}, stage-II epoch {t.epoch2}",
        evaluate)


def train_awnet(args) -> int:
    from fastrobust.trainers.awnet import (AWNetConfig, AWNetTrainer, evaluate_awnet,
                                           report_awnet)

    cfg = _config(AWNetConfig, args)
    teachers = (f"teachers {cfg.teacher_nat}, {cfg.teacher_adv}" if cfg.teacher_nat and
                cfg.teacher_adv else f"teachers trained here ({cfg.teacher_epochs} epochs)")

    def evaluate(trainer):
        result = evaluate_awnet(trainer.model, trainer.data.test, cfg, progress=_bars(),
                                baselines={"PGD-AT teacher": trainer.teacher_adv,
                                           "standard teacher": trainer.teacher_nat})
        report_awnet(result, cfg, cfg.out, f"AW-Net ResNet-18/w{cfg.width} on {cfg.dataset}")
    return _train(
        args, cfg, lambda say: AWNetTrainer(cfg, resume=args.resume, log=say,
                                            progress=_bars()),
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


def _add_oats_options(p):
    _add_oat_options(p)
    p.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                   help="width multipliers (default 0.5 0.75 1.0)")


def _add_awnet_options(p):
    from fastrobust.trainers.awnet import AWNetConfig

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


def _add_afa_options(p):
    from fastrobust.trainers.afa import AFAConfig

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


def _add_oat_options(p):
    from fastrobust.trainers.oat import OATConfig

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


def main(argv=None) -> int:
    parser = _Parser(prog="fastrobust", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="OAT on the embedded digits data (a few minutes), "
                            "then the lambda table and the trade-off plot")
    p_demo.add_argument("--epochs", type=int, default=15,
                        help="default 15, for OAT and for each dedicated model: the three "
                        "cost about 2.2 OAT runs, within 5 minutes on a 2-core CPU")
    p_demo.add_argument("--width", type=int, default=16, help="ResNet width (default 16)")
    p_demo.add_argument("--eps", type=float, default=0.3,
                        help="attack radius on the [0, 1] pixels (default 0.3; the digits' "
                        "17 grey levels make 8/255 a non-attack)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--out", default="runs/demo", help="default runs/demo")
    p_demo.add_argument("--no-dedicated", dest="dedicated", action="store_false",
                        help="skip the dedicated models at lambda 0 and 1 (OAT's baselines)")
    p_demo.set_defaults(fn=demo, parser=p_demo)

    from fastrobust.trainers.registry import METHODS

    p_train = sub.add_parser("train", help="train " + ", ".join(METHODS))
    train_sub = p_train.add_subparsers(dest="method", required=True)
    for m in METHODS.values():
        p_m = train_sub.add_parser(m.name, help=m.summary)
        m.resolve(m.options)(p_m)
        p_m.set_defaults(fn=m.resolve(m.run), parser=p_m, kinds=m.kinds)

    p_eval = sub.add_parser("eval", help="lambda sweep of a checkpoint (SA, RA, JSON, plot)")
    p_eval.add_argument("checkpoint", nargs="?", help="a trainer checkpoint, e.g. "
                        "runs/oat/last.pt, or a run directory (its last.pt)")
    p_eval.add_argument("--steps", type=int, help="PGD steps (default: the run's eval_steps)")
    p_eval.add_argument("--lambdas", type=float, nargs="+",
                        help="lambda values (default: the training set and unseen ones)")
    p_eval.add_argument("--device", default="cpu")
    p_eval.add_argument("--out", help="where to write results (default: beside the checkpoint)")
    from fastrobust.models import OAT_REPO_ARCHS

    g = p_eval.add_argument_group("a checkpoint of the OAT repository (instead of CHECKPOINT)")
    g.add_argument("--from-oat-repo", dest="from_oat_repo", metavar="CKPT",
                   help="its OAT.py checkpoint (latest.pth, best_*.pth)")
    g.add_argument("--encoding-matrix", dest="encoding_matrix", metavar="NPY",
                   help="its rand_otho_mat.npy (row j codes the j-th --lambda-choices value)")
    g.add_argument("--arch", choices=OAT_REPO_ARCHS, help="checked against the checkpoint "
                   "(default: read from its keys)")
    g.add_argument("--lambda-choices", dest="lambda_choices", type=float, nargs="+",
                   help="the run's --lambda_choices, in its order (default 0 .1 .2 .3 .4 1)")
    g.add_argument("--dataset", choices=("digits", "cifar10", "svhn"),
                   help="test data (default: cifar10 for the ResNets, svhn for WRN16_8OAT)")
    g.add_argument("--data-root", dest="data_root", help="directory with the data set's files")
    g.add_argument("--eps", type=float, help="attack radius (default 8/255); the step is the "
                   "repository's min(1.25 eps, eps + 4/255) / steps")
    p_eval.set_defaults(fn=evaluate_checkpoint, parser=p_eval)

    p_info = sub.add_parser("info", help="versions and the backend chosen for each op and device")
    p_info.set_defaults(fn=info)

    p_speed = sub.add_parser("speed", help="dual BN in a small ResNet against the OAT-style "
                             "eager form, timed")
    p_speed.add_argument("--batch", type=_at_least(1), default=64,
                         help="clean samples per batch (default 64)")
    p_speed.add_argument("--width", type=_at_least(1), default=16,
                         help="ResNet base width (default 16)")
    p_speed.add_argument("--steps", type=_at_least(0), default=5,
                         help="training steps shown (default 5)")
    p_speed.add_argument("--timing-steps", type=_at_least(1), default=10,
                         help="steps timed (default 10)")
    p_speed.set_defaults(fn=_speed)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # the train commands say more (where to resume)
        _close_bars()
        prog = args.parser.prog if hasattr(args, "parser") else f"fastrobust {args.command}"
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


if __name__ == "__main__":
    sys.exit(main())
