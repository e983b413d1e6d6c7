"""OptimizerSettingsCallback: the optimizer's learning rate and weight decay come from one place,
``model.learning_rate`` and ``model.weight_decay``.

The optimizer is AdamW on the identifier (:meth:`ADIModule.configure_optimizers`); the CLI has no
``--optimizer`` / ``--lr_scheduler`` keys. A subclass may build another optimizer, but its param
groups must start with those two values: at fit start, before a checkpoint is restored, a param
group whose ``lr`` (a scheduler's ``initial_lr`` when it has one) or ``weight_decay`` differs is
refused by name, instead of being replaced without a word.

A resumed fit restores the optimizer's state, param groups included, after ``configure_optimizers``
has built it, so the checkpoint's learning rate would silently replace a typed
``--model.learning_rate``. At train start of a resumed fit (after the restore) each param group
gets ``model.learning_rate`` and ``model.weight_decay``. Without a typed value these equal the
checkpoint's, so a resume stays bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import lightning as L


class OptimizerSettingsCallback(L.Callback):
    """Refuse param groups that disagree with the module's ``learning_rate`` / ``weight_decay``
    (ValueError at fit start); on resume, set every group's ``lr`` and ``weight_decay`` from them."""

    def on_fit_start(self, trainer, pl_module) -> None:
        hp = pl_module.hparams
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                lr, decay = group.get("initial_lr", group["lr"]), group.get("weight_decay", 0.0)
                if lr != hp.learning_rate or decay != hp.weight_decay:
                    raise ValueError(
                        f"configure_optimizers built {type(optimizer).__name__} with lr={lr}, weight_decay={decay}, "
                        f"but model.learning_rate={hp.learning_rate}, model.weight_decay={hp.weight_decay}: the "
                        "optimizer's settings come from those two keys only; build it from "
                        "self.hparams.learning_rate / self.hparams.weight_decay, or set the keys")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is None:  # nothing restored: the groups are configure_optimizers' own (checked)
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = pl_module.hparams.learning_rate
                group["weight_decay"] = pl_module.hparams.weight_decay
