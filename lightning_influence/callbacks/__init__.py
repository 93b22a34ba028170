from lightning_influence.callbacks.influence import InfluenceCallback

__all__ = ["InfluenceCallback"]
