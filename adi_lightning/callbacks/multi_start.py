"""MultiStartCallback: random restarts of the identifier, the best start continued.

On the toy jump, textual inversion, P+ and ADI settle in one of two poses within their first
50-100 steps (the jump, or an arms-up pose without its legs), decided by the order of the data; a
failed start is visible in training data alone: its anchor loss at large t, where the sampler lays
out the pose, is higher (docs/method.md "Multi-start"; the measurements: docs/notes.md). So with ``model.starts = K`` the first ``K x model.start_steps``
optimizer steps train K starts, each from the run's initial rows with a fresh AdamW state while
the data stream goes on; each start ends with :func:`large_t_anchor_loss`, and the run continues
the start with the lowest one (its rows and AdamW state). This is model selection on the training
exemplars only; no judge or evaluation image is involved.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from adi_lightning.checks import check_starts_leave_steps
from adi_lightning.data.triples import image_key, load_image

#: (anchor, timestep, noise) draws per comparison, cycling over the anchors and templates.
SELECTION_DRAWS = 96
#: Keys of the comparison's draws: fixed, so every start is scored on the same draws.
SELECTION_KEY = 1 << 40


@torch.no_grad()
def large_t_anchor_loss(pl_module, dataset, draws: int = SELECTION_DRAWS, batch_size: int = 12) -> float:
    """Mean anchor (exemplar) denoising loss of the current identifier at t in ``[large_t_min T, T)``.

    ``draws`` fixed draws: draw ``i`` is anchor ``i mod N`` of ``dataset.anchors`` (unflipped), template
    ``(i // N) mod len(dataset.prompt_templates)``, with timestep and noise keyed by ``SELECTION_KEY + i``
    (:meth:`ADIModule.compute_loss` with ``large_t_only``). Every rank computes the same value.
    """
    anchors, templates, resolution = dataset.anchors, dataset.prompt_templates, dataset.resolution
    pixels = torch.stack([load_image(r.path, resolution) for r in anchors]).to(pl_module.device)
    keys = torch.tensor([image_key(str(r.path), resolution) for r in anchors], device=pl_module.device)
    total = 0.0
    for first in range(0, draws, batch_size):
        index = torch.arange(first, min(first + batch_size, draws))
        which = (index % len(anchors)).to(pl_module.device)
        batch = {"pixel_values": pixels[which][:, None], "image_key": keys[which][:, None],
                 "flip": torch.zeros(len(index), dtype=torch.bool, device=pl_module.device),
                 "template": [templates[int(i) // len(anchors) % len(templates)] for i in index],
                 "key": SELECTION_KEY + index}
        _, per_sample = pl_module.compute_loss(batch, draw_step=0, large_t_only=True)
        total += float(per_sample.double().sum())
    return total / draws


class MultiStartCallback(L.Callback):
    """Runs ``model.starts`` starts of ``model.start_steps`` steps, then continues the best one.

    Its state (scores so far, the best start's rows and AdamW state) is saved in checkpoints, so a
    run resumed inside the starts goes on as if uninterrupted; a checkpoint trained with other starts
    is refused. Logs ``start/large_t_loss`` and ``start/index`` at the step each start ends; the
    choice (``chosen``, counted from 1 as on the console) and every start's score are written into
    the identifier file's metadata (``starts``).
    """

    def __init__(self) -> None:
        self.initial: torch.Tensor | None = None
        self.losses: list[float] = []
        self.best: dict | None = None
        self.settings: tuple[int, int] | None = None  # this run's (starts, start_steps)
        self.restored: tuple[int, int] | None = None  # those of the checkpoint resumed, if it had any

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "best": self.best, "settings": self.settings}

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses, self.best = list(state_dict["losses"]), state_dict["best"]
        self.restored = tuple(state_dict["settings"]) if state_dict.get("settings") else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        hp = pl_module.hparams
        if stage != "fit" or hp.starts == 1:
            return
        # Before any checkpoint is restored: the rows every start begins from.
        self.initial = pl_module.identifier.embedding.detach().clone()
        self.settings = (hp.starts, hp.start_steps)
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        check_starts_leave_steps(hp.starts, hp.start_steps, total)
        dataset = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        if not getattr(dataset, "anchors", None):
            raise ValueError(f"model.starts={hp.starts} scores each start on the exemplars of the training data "
                             "(ActionTripleDataModule's train_dataset.anchors), and this run has none: use model.starts=1")

    def on_train_start(self, trainer, pl_module) -> None:
        hp = pl_module.hparams
        if hp.starts > 1 and trainer.global_step > 0 and self.restored != self.settings:
            raise ValueError(
                f"model.starts={hp.starts} x model.start_steps={hp.start_steps}, but the checkpoint (step "
                f"{trainer.global_step}) was trained without these starts: resume with the settings it was trained "
                "with (model.starts=1 for a run of one start)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        hp = pl_module.hparams
        if hp.starts == 1:
            return
        if len(self.losses) < min(hp.starts, trainer.global_step // hp.start_steps):  # a start just ended
            self._end_start(trainer, pl_module, hp)
        # What the identifier file records (also right after a resume from a checkpoint).
        pl_module.start_selection = (self._selection() if len(self.losses) >= hp.starts
                                     else {"current_start": len(self.losses) + 1})

    def _end_start(self, trainer, pl_module, hp) -> None:
        """Score the start that just ended; begin the next one, or continue the best."""
        loss = float(trainer.strategy.broadcast(large_t_anchor_loss(pl_module, trainer.datamodule.train_dataset)))
        self.losses.append(loss)
        optimizer = trainer.optimizers[0]
        table = pl_module.identifier.embedding
        if self.best is None or loss < self.best["loss"]:
            self.best = {"start": len(self.losses), "loss": loss, "rows": table.detach().cpu().clone(),
                         "optimizer": copy.deepcopy(optimizer.state_dict())}
        if trainer.is_global_zero:  # at this step exactly (self.log would wait for log_every_n_steps)
            for logger in trainer.loggers:
                logger.log_metrics({"start/large_t_loss": loss, "start/index": len(self.losses)}, step=trainer.global_step)
        rank_zero_info(f"multi-start: start {len(self.losses)} of {hp.starts} ended at step {trainer.global_step}, "
                       f"large-t anchor loss {loss:.5f}")
        with torch.no_grad():
            if len(self.losses) < hp.starts:  # the next start: initial rows, fresh AdamW moments
                table.copy_(self.initial.to(table))
                optimizer.state.clear()
                return
            table.copy_(self.best["rows"].to(table))
        optimizer.load_state_dict(self.best["optimizer"])
        for group in optimizer.param_groups:  # the run's own settings, not those saved with the start
            group["lr"], group["weight_decay"] = hp.learning_rate, hp.weight_decay
        rank_zero_info(f"multi-start: continuing start {self.best['start']} (large-t anchor loss {self.best['loss']:.5f})")

    def _selection(self) -> dict:
        return {"chosen": self.best["start"], "large_t_losses": [round(x, 6) for x in self.losses]}
