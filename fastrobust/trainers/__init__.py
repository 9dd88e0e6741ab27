"""Reference trainers: OAT and OATS, AFA, AW-Net (one module each, on the shared base in
`fastrobust.trainers.common`)."""
from .afa import AFAConfig, AFATrainer
from .awnet import AWNetConfig, AWNetTrainer
from .common import (BaseConfig, BaseTrainer, CheckpointError, ConfigError,
                     TrainingDiverged)
from .oat import OATConfig, OATTrainer, oat_loss, sweep

__all__ = ["OATConfig", "OATTrainer", "AFAConfig", "AFATrainer", "AWNetConfig", "AWNetTrainer",
           "BaseConfig", "BaseTrainer", "oat_loss", "sweep", "TrainingDiverged", "ConfigError",
           "CheckpointError"]
