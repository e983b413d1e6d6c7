"""PreemptionCallback: a resumable checkpoint at the next optimizer-step boundary after a stop signal.

Schedulers stop a job with SIGTERM (SLURM: ``--signal`` sends the requeue signal, SIGUSR1, first).
Lightning's signal connector sets ``trainer.received_sigterm`` and raises ``SIGTERMException`` at
the end of the current batch, and under SLURM auto-requeue its SIGUSR1 handler saves
``hpc_ckpt_N.ckpt`` from inside the signal handler, i.e. wherever the signal lands: possibly in the
middle of an optimizer step, while the gradient mask's restore hook
(:class:`~adi_lightning.callbacks.GradientMaskCallback`) is armed.

This callback moves both to the end of the next optimizer step (``on_train_batch_end`` of a batch
that stepped, after every other callback but ``ModelCheckpoint``, as ``ModelCheckpoint`` itself
saves):

- SIGTERM: it writes ``<run>/stopped-step=N.ckpt`` (N = global step; atomically, through the
  CLI's :class:`~adi_lightning.checkpoint_io.AtomicCheckpointIO`), then lets Lightning raise. Mid-accumulation it holds Lightning's flag back
  until the batch that steps. ``adi_lightning.cli.main`` turns the exception into exit status 143
  and one line naming the checkpoint to resume from.
- SLURM's requeue signal: it runs Lightning's own handler there (``hpc_ckpt_N.ckpt`` in the run
  folder, then ``scontrol requeue``); training goes on until SLURM's SIGTERM.

Under DDP the ranks agree on the stop at each step boundary (``reduce_boolean_decision``), so
all of them take part in the save. A signal during validation, or before the first step, leaves
the checkpoints written so far.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)
STOPPED_NAME = "stopped-step={step}.ckpt"


class PreemptionCallback(L.Callback):
    def __init__(self) -> None:
        self._held = False  # a SIGTERM held back until the batch that steps
        self._requeue_signum = None  # SLURM's requeue signal, when it arrived
        self._lightning_requeue = None  # Lightning's handler for it
        self.saved: Path | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._held, self._requeue_signum, self.saved = False, None, None
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(env.requeue_signal)
        if not callable(handler):
            return
        # Lightning's connector restores the original handlers at teardown, so this needs no undo.
        self._lightning_requeue = handler
        signal.signal(env.requeue_signal, self._note_requeue)

    def _note_requeue(self, signum, frame) -> None:
        self._requeue_signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        connector = trainer._signal_connector
        stepped = not trainer.fit_loop.epoch_loop._should_accumulate()
        if connector.received_sigterm and not stepped:
            connector.received_sigterm, self._held = False, True  # Lightning would raise mid-accumulation
            return
        if not stepped:
            return
        stop = connector.received_sigterm or self._held
        requeue = self._requeue_signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
        if requeue:
            signum, self._requeue_signum = self._requeue_signum or signal.SIGUSR1, None
            self._lightning_requeue(signum, None)
        if stop:
            self.saved = self.save(trainer)
            connector.received_sigterm, self._held = True, False  # Lightning raises SIGTERMException now

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A SIGTERM that landed after :meth:`on_train_batch_end` but before Lightning's check at the
        end of that batch (while ``ModelCheckpoint`` saved, say): the loop stopped at a step boundary
        all the same, so the checkpoint is written here. Not in the middle of an accumulation, nor
        during validation: there the newest checkpoint is the one to resume from."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if (isinstance(exception, SIGTERMException) and self.saved is None and trainer.training
                and not trainer.fit_loop.epoch_loop._should_accumulate()):
            self.saved = self.save(trainer)

    def save(self, trainer) -> Path:
        """Write ``stopped-step=N.ckpt`` into the run folder (all ranks call; rank zero writes)."""
        target = Path(trainer.default_root_dir) / STOPPED_NAME.format(step=trainer.global_step)
        trainer.save_checkpoint(target)  # atomic: the CLI's AtomicCheckpointIO writes beside it and renames
        if trainer.is_global_zero:
            log.info("stop signal: checkpoint at step %d written to %s", trainer.global_step, target)
        return target
