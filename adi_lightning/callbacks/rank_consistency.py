"""RankConsistencyCallback: fail fast if DDP ranks ever hold different identifiers.

Every rank writes the same masked update, so after each optimizer step the identifier (and the
mask) must be bit-identical everywhere. A gather of ``[L, D]`` floats costs nothing next to a
UNet step, and a silent divergence would waste a weekend of GPUs.
"""

from __future__ import annotations

import lightning as L
import torch

from adi_lightning.distributed import all_gather_tensor


class RankConsistencyCallback(L.Callback):
    """After every optimizer step under DDP, compare the identifier and mask across ranks."""

    def __init__(self) -> None:
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size < 2 or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        tensors = {"identifier": pl_module.identifier.embedding.detach()}
        masker = next((c for c in trainer.callbacks if hasattr(c, "last_masks")), None)
        if masker is not None and masker.last_masks is not None:
            tensors["mask"] = masker.last_masks.to(torch.uint8)
        for name, tensor in tensors.items():
            gathered = all_gather_tensor(tensor)
            if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
                raise RuntimeError(f"DDP ranks diverged: the {name} differs across ranks after global step {trainer.global_step}")
