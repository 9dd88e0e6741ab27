"""Reference trainers: OAT (`fastrobust.trainers.oat`) on the fused ops, with checkpoints,
exact resume, the λ sweep, JSON results and the trade-off plot (`fastrobust.trainers.common`)."""
from .common import TrainingDiverged
from .oat import OATConfig, OATTrainer, oat_loss, sweep

__all__ = ["OATConfig", "OATTrainer", "oat_loss", "sweep", "TrainingDiverged"]
