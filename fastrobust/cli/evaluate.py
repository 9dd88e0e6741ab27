"""`fastrobust eval`: the λ sweep (SA, RA, JSON, plot) of a trainer checkpoint, or with
``--from-oat-repo CKPT --encoding-matrix NPY`` of a checkpoint of the OAT repository, loaded
with `fastrobust.models.from_oat_repo`."""
from __future__ import annotations

import os
import sys

from ..data import DataCorrupt, DataMissing
from ..data import load as load_data
from ..models import S1, from_oat_repo
from ..trainers.checkpoints import CheckpointError
from ..trainers.config import ConfigError, check_device
from ..trainers.oat import OATConfig, model_from_checkpoint, report, sweep_all
from .console import bars, flag

# the data set each of the repository's models was trained on, where fastrobust reads it
_DATASETS = {"ResNet34OAT": "cifar10", "SlimmableResNet34OAT": "cifar10",
             "WRN16_8OAT": "svhn"}
# from_oat_repo's argument names → this command's flags
_FLAGS = {"checkpoint": "--from-oat-repo", "encoding_matrix": "--encoding-matrix",
          "arch": "--arch", "lambdas": "--lambda-choices"}


def evaluate_oat_repo(args, report_progress: bool = False) -> int:
    p = args.parser
    choices = tuple(args.lambda_choices) if args.lambda_choices is not None else S1
    try:
        check_device(args.device)
        model = from_oat_repo(args.from_oat_repo, args.encoding_matrix, args.arch, choices)
    except ValueError as e:
        name, _, rest = str(e).partition(": ")
        p.error(f"{_FLAGS[name]}: {rest}" if name in _FLAGS else str(e))
    except ConfigError as e:
        p.error(f"--{e.field} {e.message}")
    arch = model.oat_repo_arch
    lambdas = list(args.lambdas) if args.lambdas is not None else list(choices)
    unknown = [v for v in lambdas if not any(abs(v - c) < 1e-9 for c in choices)]
    if unknown:
        p.error(f"--lambdas {unknown[0]:g} is not in the model's set {list(choices)} (the "
                "repository's models encode those values only; see --lambda-choices)")
    dataset = args.dataset or _DATASETS.get(arch)
    if dataset is None:
        p.error(f"--dataset is needed: {arch} was not trained on a data set fastrobust "
                "reads by default (WRN40_2OAT: STL-10, which fastrobust.data does not read)")
    eps = 8 / 255 if args.eps is None else args.eps
    cfg = OATConfig(dataset=dataset, data_root=args.data_root, lambdas=tuple(choices),
                    eps=eps, eval_steps=7 if args.steps is None else args.steps,
                    steps=7 if args.steps is None else max(args.steps, 1), eval_unseen=(),
                    device=args.device, widths=tuple(model.width_mults or ()))
    try:
        cfg.validate()
        ds = load_data(dataset, args.data_root)
    except ConfigError as e:
        flag = {"eps": "--eps", "eval_steps": "--steps"}.get(e.field, f"--{e.field}")
        p.error(f"{flag} {e.message}")
    except (CheckpointError, DataMissing, DataCorrupt) as e:
        p.error(str(e))
    if ds.in_channels != model.conv1.in_channels:
        p.error(f"--dataset {dataset} has {ds.in_channels}-channel images, but the "
                f"checkpoint's {arch} takes {model.conv1.in_channels}")
    if ds.num_classes != model.fc.out_features:
        p.error(f"--dataset {dataset} has {ds.num_classes} classes, but the checkpoint's "
                f"{arch} predicts {model.fc.out_features}")
    model = model.to(args.device)
    print(f"{arch} from {args.from_oat_repo} on {dataset}: PGD-{cfg.eval_steps} (eps "
          f"{eps:.4g}, alpha {cfg.step_size(cfg.eval_steps):.4g}), lambdas {lambdas}")
    rows = sweep_all(model, ds.test, cfg, lambdas=lambdas, steps=cfg.eval_steps,
                     progress=report_progress)
    out = args.out or os.path.dirname(os.path.abspath(args.from_oat_repo))
    report(rows, cfg, out, f"{arch} (OAT repository) on {dataset}")
    return 0


def evaluate_checkpoint(args) -> int:
    p = args.parser
    if args.steps is not None and args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    if args.from_oat_repo is not None:
        if args.checkpoint is not None:
            p.error(f"give either CHECKPOINT ({args.checkpoint}) or --from-oat-repo, not both")
        return evaluate_oat_repo(args, report_progress=bars())
    repo_only = [f for f in ("encoding_matrix", "arch", "lambda_choices", "dataset",
                             "data_root", "eps") if getattr(args, f) is not None]
    if repo_only:
        p.error(f"{flag(p, repo_only[0])} goes with --from-oat-repo")
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
                     progress=bars())
    out = args.out or os.path.dirname(os.path.abspath(path))
    report(rows, cfg, out, f"{cfg.method.upper()} {cfg.arch} on {cfg.dataset} ({path})")
    return 0
