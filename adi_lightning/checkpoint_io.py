"""Lightning checkpoints written atomically beside their target.

Lightning's ``TorchCheckpointIO`` writes a checkpoint to a temp file in the system temp folder and
moves it into place; across filesystems that move is a copy, so a full disk or a kill leaves a torn
``epoch=0-step=20.ckpt`` that looks like a result. :class:`AtomicCheckpointIO` writes a temp file
in the checkpoint's own folder and renames it (:func:`adi_lightning.io.atomic_path`): the target is
the old file or the new one, and a failed write is one :class:`~adi_lightning.io.WriteError` line.
The CLI makes it the trainer's checkpoint plugin for every run (``ADICLI``); in DDP only global
rank zero writes, as with Lightning's own.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from adi_lightning.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic; remote URLs (``s3://``) and
    ``storage_options`` go to Lightning's own (which then refuses the options, as before)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
