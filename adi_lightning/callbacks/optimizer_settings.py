"""OptimizerSettingsCallback: the optimizer uses the run's learning rate and weight decay.

A resumed fit restores AdamW's state, param groups included, after ``configure_optimizers`` has
built it, so the checkpoint's learning rate would silently replace a typed ``--model.learning_rate``.
At train start (after the restore) each param group gets ``model.learning_rate`` and
``model.weight_decay``. Without a typed value these equal the checkpoint's, so a resume stays
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import lightning as L


class OptimizerSettingsCallback(L.Callback):
    """Set every param group's ``lr`` and ``weight_decay`` from the module's hyperparameters."""

    def on_train_start(self, trainer, pl_module) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = pl_module.hparams.learning_rate
                group["weight_decay"] = pl_module.hparams.weight_decay
