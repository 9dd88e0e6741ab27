"""Reference trainers: OAT and OATS, AFA, AW-Net (one module each, on the shared base in
`fastrobust.trainers.common`); `METHODS` (fastrobust.trainers.registry) names them for the
command line."""
from .afa import AFAConfig, AFATrainer
from .awnet import AWNetConfig, AWNetTrainer
from .common import (BaseConfig, BaseTrainer, CheckpointError, ConfigError,
                     TrainingDiverged)
from .oat import OATConfig, OATTrainer, oat_loss, sweep
from .registry import METHODS, Method, register

__all__ = ["OATConfig", "OATTrainer", "AFAConfig", "AFATrainer", "AWNetConfig", "AWNetTrainer",
           "BaseConfig", "BaseTrainer", "oat_loss", "sweep", "TrainingDiverged", "ConfigError",
           "CheckpointError", "METHODS", "Method", "register"]
