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
import platform
import sys

import torch

from .. import __version__, backends
from ..demo import run_demo
from ..models import OAT_REPO_ARCHS
from ..trainers.config import ConfigError
from ..trainers.oat import OATConfig
from ..trainers.registry import METHODS
from .console import Parser, at_least, bars, close_bars, flag
from .evaluate import evaluate_checkpoint
from .speed import speed

__all__ = ["main", "info"]


def info(_args=None) -> int:
    why = backends.triton.missing()
    if why is None:
        import triton
        triton_version = triton.__version__
    else:
        triton_version = f"unavailable: {why}"
    print(f"fastrobust {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version}, {torch.get_num_threads()} CPU threads, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print("\nbackends (op, device -> chosen; why not the others):")
    print(backends.describe())
    return 0


def _speed(args) -> int:
    info()
    return speed(args)


def demo(args) -> int:
    cfg = OATConfig(dataset="digits", arch="resnet18", width=args.width, epochs=args.epochs,
                    batch_size=64, lr=0.05, eps=args.eps, steps=7, out=args.out,
                    seed=args.seed, eval_steps=7)
    try:
        cfg.validate()
    except ConfigError as e:
        args.parser.error(f"{flag(args.parser, e.field)} {e.message}")
    info()
    return run_demo(cfg, dedicated=args.dedicated, progress=bars())


def main(argv=None) -> int:
    parser = Parser(prog="fastrobust", description=__doc__,
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
    p_speed.add_argument("--batch", type=at_least(1), default=64,
                         help="clean samples per batch (default 64)")
    p_speed.add_argument("--width", type=at_least(1), default=16,
                         help="ResNet base width (default 16)")
    p_speed.add_argument("--steps", type=at_least(0), default=5,
                         help="training steps shown (default 5)")
    p_speed.add_argument("--timing-steps", type=at_least(1), default=10,
                         help="steps timed (default 10)")
    p_speed.set_defaults(fn=_speed)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # the train commands say more (where to resume)
        close_bars()
        prog = args.parser.prog if hasattr(args, "parser") else f"fastrobust {args.command}"
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
