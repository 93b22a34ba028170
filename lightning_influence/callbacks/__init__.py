"""The Lightning callbacks: explanations (InfluenceCallback), mislabel candidates (MislabelCallback) and the
training signals they record (TrainingSignalsCallback)."""

from lightning_influence.callbacks.influence import InfluenceCallback
from lightning_influence.callbacks.mislabel import MislabelCallback
from lightning_influence.callbacks.training_signals import TrainingSignalsCallback

__all__ = ["InfluenceCallback", "MislabelCallback", "TrainingSignalsCallback"]
