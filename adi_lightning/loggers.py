"""Loggers of the shipped configs (``configs/logger/``): Lightning's, minus what they print for nothing."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, with the same arguments. Lightning 2.6 always hands ``wandb.init`` an
    ``anonymous`` setting (None unless ``anonymous=True``), which wandb >= 0.19 ignores with the notice
    "The anonymous setting has no effect"; this logger passes it only when it is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
