"""What a failed run leaves behind (docs/outputs.md "A failed run").

The rule: when a command fails, its run folder is kept if it holds a result, and removed if it
holds only bookkeeping (``config.yaml``, ``run_info.json``, a logger's ``hparams.yaml``, a
``metrics.csv`` without a logged row), and the temp files of an interrupted atomic write
(:func:`adi_lightning.io.is_temp_file`: never a result, whatever their size). A result is any other file: a checkpoint, an identifier
file, images, evaluation metrics, logs with at least one logged step.

A ``fit`` that fails after at least one completed step first saves the last good identifier, the
last one whose training loss was finite, as ``identifier_last_good.safetensors``; such a folder
is therefore always kept. A failure before that leaves nothing worth keeping.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)
LAST_GOOD_FILE = "identifier_last_good.safetensors"
_BOOKKEEPING = ("config.yaml", "run_info.json", "hparams.yaml")


class LastGoodIdentifierCallback(L.Callback):
    """Keeps a device copy of the identifier each training batch starts from; when the batch
    ends (its loss was finite, its step done) that copy is the last good one. On any exception
    during ``fit`` the last good identifier is written atomically to the run folder, unless it
    is the one the run started from."""

    def __init__(self) -> None:
        self._start_step = 0
        self._pending: tuple[int, torch.Tensor] | None = None
        self._good: tuple[int, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step, self._pending, self._good = trainer.global_step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._pending = (trainer.global_step, pl_module.identifier.embedding.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._good = self._pending

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._good is None or not trainer.is_global_zero:
            return
        step, table = self._good
        if step <= self._start_step or not bool(torch.isfinite(table).all()):
            return
        meta = {**pl_module.identifier_metadata(), "global_step": str(step),
                "stopped_by": f"{type(exception).__name__}: {exception}"[:500]}
        try:
            path = pl_module.identifier.save(pl_module.run_dir / LAST_GOOD_FILE, meta, table=table)
        except Exception as err:  # never hide the original failure behind this one
            log.warning("could not save the last good identifier: %s", err)
        else:
            log.info("last good identifier (step %d) written to %s", step, path)


def run_results(run_dir: str | Path) -> list[Path]:
    """The files of a run folder that count as results under the rule above, sorted."""
    from adi_lightning.io import is_temp_file

    found = []
    for path in sorted(Path(run_dir).rglob("*")):
        if not path.is_file() or path.name in _BOOKKEEPING or is_temp_file(path):
            continue
        if path.name == "metrics.csv" and len(path.read_text(errors="replace").splitlines()) < 2:
            continue  # a header without a logged row
        found.append(path)
    return found
