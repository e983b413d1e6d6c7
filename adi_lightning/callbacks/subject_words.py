"""SubjectWordsCallback: projected gradient descent that keeps the exemplars' subject out of the identifier.

With ``model.subject_words`` set, after every optimizer step (and after
:class:`~adi_lightning.callbacks.GradientMaskCallback`'s restore, which acts first: it comes first in
:data:`adi_lightning.module.METHOD_CALLBACKS`) the table becomes ``E0 + (Δ − (Δ B) Bᵀ)``, with
``Δ = E − E0``, ``E0`` the untrained table (``identifier.initial``) and ``B`` ``[D, K]`` the orthonormal
basis of the words' token embeddings (``ADIModule.subject_basis``): the identifier's change from its
initializer has no component along any subject word (docs/method.md "Subject words"). Multi-start's
restarts begin at rows whose change is already projected (or zero), so every start obeys it too.

DDP: the projection is a deterministic function of the table, which every rank holds identically after
the same step, so each rank projects on its own and the tables stay equal; nothing is communicated.
"""

from __future__ import annotations

import lightning as L
import torch

from adi_lightning.callbacks.after_step import AfterStep
from adi_lightning.word_directions import without_directions


def project_identifier(pl_module) -> None:
    """In place: the identifier's change from ``identifier.initial`` loses its part along ``pl_module.subject_basis``."""
    identifier = pl_module.identifier
    with torch.no_grad():
        table = identifier.embedding
        initial = identifier.initial.to(table)
        table.copy_(initial + without_directions(table - initial, pl_module.subject_basis))


class SubjectWordsCallback(L.Callback):
    """Projects the identifier after each optimizer step; configured by ``model.subject_words`` (off when empty)."""

    def __init__(self) -> None:
        self._project = AfterStep()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._project.disarm()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        self._project.disarm()  # a step skipped by the AMP scaler leaves its hook armed
        if pl_module.subject_basis is not None:
            self._project.arm(optimizer, lambda: project_identifier(pl_module))
