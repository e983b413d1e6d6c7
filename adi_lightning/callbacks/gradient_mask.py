"""GradientMaskCallback: ADI's channel-wise gradient masking, applied before each optimizer step.

It runs in ``on_before_optimizer_step`` (never ``on_after_backward``, which under gradient
accumulation sees unsynced, partial gradients): it gathers every rank's per-triple role
gradients, builds each triple's mask with :mod:`adi_lightning.masking`, writes the same
update into ``E.grad`` on every rank, and after the step restores the channels that no triple
kept, so AdamW momentum and weight decay cannot move them.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from adi_lightning.callbacks.after_step import AfterStep
from adi_lightning.distributed import all_gather_tensor
from adi_lightning.masking import MaskedUpdate, kept_fraction_per_layer, masked_update

log = logging.getLogger(__name__)


def gather_in_batch_order(pl_module, records: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """Every rank's triples, ``[N, 3, R, D]``, in the order one rank with the whole global batch
    would have recorded them: micro-batch by micro-batch, rank by rank within each."""
    if world_size == 1:
        return torch.cat(records)
    if len({r.shape for r in records}) == 1:
        gathered = all_gather_tensor(torch.stack(records))  # [W, M, b, 3, R, D]
        return gathered.transpose(0, 1).flatten(0, 2)
    return all_gather_tensor(torch.cat(records)).flatten(0, 1)


class GradientMaskCallback(L.Callback):
    """Masks the identifier's update; configured by the model's ``mask_*`` / ``update_from`` keys."""

    def __init__(self) -> None:
        self._restore = AfterStep()
        self.last_masks: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._restore.disarm()  # removed here, never from inside the optimizer's own hook loop

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        self._restore.disarm()  # a step skipped by the AMP scaler leaves its hook armed
        if not pl_module.masking_enabled:
            return
        records = pl_module.pop_role_grads()
        if not records:
            raise RuntimeError("masking is on but no per-sample identifier gradients were recorded this step")
        role_grads = gather_in_batch_order(pl_module, records, trainer.world_size)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        result = self.apply(pl_module, role_grads, optimizer, scale, trainer.global_step)
        if result is None:
            return
        masks = result.masks
        kept = kept_fraction_per_layer(masks)
        never_kept = ~masks.any(dim=0)
        pl_module.log("mask/kept_fraction", kept.mean(), batch_size=masks.shape[0])
        pl_module.log("mask/kept_energy", result.kept_energy, batch_size=masks.shape[0])
        pl_module.log("mask/never_kept_fraction", never_kept.float().mean(), batch_size=masks.shape[0])
        if kept.numel() > 1 and (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log_dict({f"mask/kept_fraction_row{i:02d}": v for i, v in enumerate(kept)}, batch_size=masks.shape[0])

    def apply(self, pl_module, role_grads: torch.Tensor, optimizer, scale: float | None = None,
              step: int = 0) -> MaskedUpdate | None:
        """Write the masked update into ``E.grad`` and arm the post-step restore.

        ``role_grads`` ``[N, 3, R, D]`` are every rank's triples; ``scale`` is the AMP loss scale
        they still carry (Lightning unscales ``.grad``, not our recorded copies). Returns the
        :class:`~adi_lightning.masking.MaskedUpdate`, or None when the step is to be skipped by the AMP
        scaler (non-finite gradients).
        """
        if scale is not None:
            role_grads = role_grads / scale
        if not torch.isfinite(role_grads).all():
            if scale is not None:
                return None  # the scaler saw the same inf in E.grad and skips this step
            raise FloatingPointError(f"non-finite identifier gradient at global step {step}")

        hp = pl_module.hparams
        result = masked_update(role_grads, hp.mask_threshold, hp.mask_combine, hp.update_from, hp.mask_statistic)
        param = pl_module.identifier.embedding
        param.grad = result.update.to(device=param.device, dtype=param.dtype)
        self.last_masks = masks = result.masks

        never_kept = ~masks.any(dim=0)
        if bool(never_kept.any()):
            snapshot = param.detach().clone()

            def restore() -> None:
                with torch.no_grad():
                    param.copy_(torch.where(never_kept.to(param.device), snapshot, param))

            self._restore.arm(optimizer, restore)

        return result
