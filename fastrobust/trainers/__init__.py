"""Reference trainers: OAT and OATS, AFA, AW-Net (one module each, on the shared base:
`base` the fit loop and ranks, `config` the shared fields and their checks, `checkpoints`
atomic checkpoints and resume, `results` tables, JSON and plots); `METHODS`
(fastrobust.trainers.registry) names them for the command line."""
from .afa import AFAConfig, AFATrainer
from .awnet import AWNetConfig, AWNetTrainer
from .base import BaseTrainer, TrainingDiverged
from .checkpoints import CheckpointError
from .config import BaseConfig, ConfigError
from .oat import OATConfig, OATTrainer, oat_loss, sweep
from .registry import METHODS, Method, register

__all__ = ["OATConfig", "OATTrainer", "AFAConfig", "AFATrainer", "AWNetConfig", "AWNetTrainer",
           "BaseConfig", "BaseTrainer", "oat_loss", "sweep", "TrainingDiverged", "ConfigError",
           "CheckpointError", "METHODS", "Method", "register"]
