"""ValidationScheduleCallback: judged curves during ``fit`` that judge what the run keeps, and leave it as it is.

``trainer.val_check_interval = N`` (steps) validates at every multiple of N, Lightning's own schedule.
Around it, this callback

- skips the validations inside the multi-start phase (``model.starts`` > 1, the first ``starts x
  start_steps`` steps): they would judge a start that may be discarded, so no image is generated
  there (:attr:`ADIModule.skip_generation`);
- validates at the run's last step even when the schedule misses it (``trainer.max_steps`` not a
  multiple of N), through Lightning's ``trainer.should_stop``, which validates before stopping; a run
  with a judge (``model.judge`` and ``data.eval_subjects``) does so even when N exceeds the run: the last
  judged metrics (``val/clean_both_correct_word``, the one sweeps optimise) are always the final identifier's;
- isolates the random number generators: every RNG state (torch, CUDA, numpy, Python) is saved after
  each training batch (before Lightning opens the validation loader, which draws a seed from torch's
  RNG) and restored when a validation inside ``fit`` ends (the sanity check likewise), so validation
  consumes no training RNG stream and the trained identifier is bit-identical to a run without it.

Without a judge, an interval above ``trainer.max_steps`` validates nowhere, as in Lightning;
``trainer.limit_val_batches=0`` turns validation off in every run.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def in_starts(pl_module, step: int) -> bool:
    """Whether ``step`` (optimizer steps done) lies inside the multi-start phase, the last start's
    end included (its choice is made at the next step)."""
    hp = pl_module.hparams
    return hp.get("starts", 1) > 1 and step <= hp.starts * hp.start_steps


def judged(trainer, pl_module) -> bool:
    """Whether validation judges images (a ``model.judge`` and ``data.eval_subjects``): such a run always
    ends with a validation, whatever ``trainer.val_check_interval`` (its metric is what sweeps optimise)."""
    return (getattr(pl_module, "judge", None) is not None
            and bool(getattr(getattr(trainer, "datamodule", None), "eval_subjects", None)))


class ValidationScheduleCallback(L.Callback):
    def __init__(self) -> None:
        self._rng: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The RNG states a validation right after this batch must give back: saved here, before Lightning
        # starts the validation loop (its DataLoader iterator draws a seed from torch's global RNG
        # before any validation hook runs). A few KiB of state per batch.
        self._rng = _collect_rng_states(include_cuda=torch.cuda.is_initialized())
        every, last = trainer.val_check_batch, trainer.max_steps  # every: batches, as Lightning counts them
        scheduled = isinstance(every, int) and every <= last * trainer.accumulate_grad_batches
        if (last > 0 and trainer.global_step >= last and trainer.limit_val_batches != 0
                and (scheduled or judged(trainer, pl_module))):
            # Lightning validates before it stops (it stops here anyway); once, if the interval hits here too.
            trainer.should_stop = True

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._rng = _collect_rng_states(include_cuda=torch.cuda.is_initialized())

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            pl_module.skip_generation = in_starts(pl_module, trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        pl_module.skip_generation = False
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._restore()

    def _restore(self) -> None:
        if self._rng is not None:
            _set_rng_states(self._rng)
            self._rng = None
