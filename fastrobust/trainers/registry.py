"""The training methods, by the name `fastrobust train <method>` takes. The command line is built
from this table: adding a method is a trainer module, its command-line options and runner, and
one `Method` here.

References are "module:attribute" strings, resolved when used, so listing the methods imports
no trainer."""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str                # `fastrobust train <name>`
    summary: str             # its help line
    config: str              # the config dataclass (a BaseConfig)
    trainer: str             # the trainer class (a BaseTrainer)
    options: str             # adds the method's options to an argparse parser
    run: str                 # runs the parsed command, returns the exit status
    kinds: tuple[str, ...]   # the checkpoint kinds `--resume` accepts

    @staticmethod
    def resolve(ref: str):
        module, attr = ref.split(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"a training method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


register(Method("oat", "Once-for-All Adversarial Training", "fastrobust.trainers.oat:OATConfig",
                "fastrobust.trainers.oat:OATTrainer", "fastrobust.cli.train:add_oat_options",
                "fastrobust.cli.train:train_oat", ("oat", "oats")))
register(Method("oats", "OATS: OAT with slimmable widths and a switchable dual BN per width",
                "fastrobust.trainers.oat:OATConfig", "fastrobust.trainers.oat:OATTrainer",
                "fastrobust.cli.train:add_oats_options", "fastrobust.cli.train:train_oat",
                ("oat", "oats")))
register(Method("afa", "AFA: K-way BN over attack strengths (stage I), then the weight "
                "generator (stage II)", "fastrobust.trainers.afa:AFAConfig",
                "fastrobust.trainers.afa:AFATrainer", "fastrobust.cli.train:add_afa_options",
                "fastrobust.cli.train:train_afa", ("afa",)))
register(Method("awnet", "AW-Net: dynamic filter weights from an adversarial detector, MixBN, "
                "two-teacher distillation", "fastrobust.trainers.awnet:AWNetConfig",
                "fastrobust.trainers.awnet:AWNetTrainer",
                "fastrobust.cli.train:add_awnet_options", "fastrobust.cli.train:train_awnet",
                ("awnet",)))
