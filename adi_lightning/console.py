"""What the CLI prints: library notices a user cannot act on are silenced at their source (logger
choice, progress-bar config, the libraries' own switches) or, where there is none, filtered by exact
message at the entry point; every command ends with a short summary of what it wrote.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from adi_lightning import DropMessages

#: The rates the summary shows first; every leak follows (:func:`summary_metrics`).
SUMMARY_RATES = ("action_acc", "subject_acc", "clean_both_correct")


def quiet_libraries() -> None:
    """Silence the notices listed in docs/outputs.md "The console"; never the user's own warnings."""
    # (transformers' torchvision notice: filtered on import of adi_lightning, for plain Python too)
    # Lightning's advert for its cloud logger, printed on every run.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(DropMessages("litlogger"))
    # torch >= 2.10 deprecates LeafSpec, which Lightning 2.6 still calls (nothing to act on).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # The frozen backbone is in eval mode on purpose (ADIModule.train keeps it there).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Loading bars of diffusers / transformers inside our own progress reporting.
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _step_metrics(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the logger's version number: not a training metric
    return metrics


def run_steps(trainer) -> int:
    """Optimizer steps of the whole run: ``trainer.max_steps``, else Lightning's estimate."""
    return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)


def phase(pl_module) -> str:
    """Where a multi-start run stands (``model.starts`` > 1, :class:`~adi_lightning.callbacks.MultiStartCallback`):
    ``"start 3 of 8"`` while the starts train, ``"start 2 of 8 chosen"`` after; ``""`` for one start."""
    starts = int(getattr(pl_module, "hparams", {}).get("starts", 1))
    selection = getattr(pl_module, "start_selection", None) or {}
    if starts <= 1 or not selection:
        return ""
    if "chosen" in selection:
        return f"start {selection['chosen']} of {starts} chosen"
    return f"start {selection['current_start']} of {starts}"


def _train_description(pl_module) -> str:
    now = phase(pl_module)
    return f"train, {now}" if now else "train"


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar over the whole run: one training bar counting optimizer steps to
    ``trainer.max_steps`` (from the checkpoint's step on resume; not batches per epoch), so its time
    column's second figure is the run's ETA; the multi-start phase in its description ("train, start 3
    of 8", then "train, start 2 of 8 chosen"), the training loss beside it, and no ``v_num``."""

    @property
    def total_train_batches(self) -> int:
        return run_steps(self.trainer)

    def _get_train_description(self, current_epoch: int) -> str:
        return _train_description(self.trainer.lightning_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is not None:  # a new epoch: same bar goes on
            return
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a run resumed mid-epoch
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=_train_description(pl_module))
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module):
        return _step_metrics(super().get_metrics(trainer, pl_module))


class StepTQDMProgressBar(TQDMProgressBar):
    """The tqdm bar (where ``rich`` is not installed), over the whole run like
    :class:`StepRichProgressBar`: steps of ``trainer.max_steps`` with tqdm's ETA, the multi-start phase,
    the loss, no ``v_num``."""

    @property
    def total_train_batches(self) -> int:
        return run_steps(self.trainer)

    def on_train_epoch_start(self, trainer, *_) -> None:
        bar = self.train_progress_bar
        if getattr(bar, "total", None) == run_steps(trainer):  # a new epoch: same bar goes on
            return
        bar.reset(total=run_steps(trainer))
        bar.initial = bar.n = trainer.global_step  # resumed: ETA from the steps still to do
        bar.set_description(_train_description(trainer.lightning_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(n, bar.total):
            bar.set_description(_train_description(pl_module), refresh=False)
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module):
        return _step_metrics(super().get_metrics(trainer, pl_module))


def default_progress_bar() -> str:
    """Class path of the bar the CLI adds when the config names none."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return f"{__name__}.StepTQDMProgressBar"
    return f"{__name__}.StepRichProgressBar"


def summary_metrics(values: dict) -> list[str]:
    """``"<name> 0.93 (untrained 0.00)"`` for action, subject, clean both-correct and every leak of a
    metrics report, in that order, each beside its untrained rate and, for a leak, the action word's
    rate (``<leak>_word``) where the report has it; NaN / missing rates are left out."""
    def known(key: str) -> bool:
        return isinstance(values.get(key), (int, float)) and not math.isnan(values[key])

    leaks = [k for k in values if (k.startswith("leak_") or k == "appearance_leak")
             and not k.endswith(("_untrained", "_excess", "_word"))]
    leaks.sort(key=lambda k: (k == "appearance_leak", k == "leak_pool_appearance", k != "leak_subject", k))
    shown = []
    for name in (*SUMMARY_RATES, *leaks):
        if not known(name):
            continue
        # (clean_both_correct_word is another metric, not the word's rate: only leaks have a word reference)
        refs = [f"{ref} {values[f'{name}_{ref}']:.2f}" for ref in ("untrained", "word")
                if known(f"{name}_{ref}") and (ref == "untrained" or name in leaks)]
        shown.append(f"{name} {values[name]:.2f}" + (f" ({', '.join(refs)})" if refs else ""))
    return shown


def run_summary(subcommand: str, run_dir: str | Path, seconds: float) -> list[str]:
    """The closing lines of a command: run folder, identifier, latest grid, plots, latest judged metrics
    (:func:`summary_metrics`: every leak, each beside its references)."""
    run_dir = Path(run_dir)
    lines = [f"adi_lightning: {subcommand} finished in {_duration(seconds)}", f"  run folder  {run_dir}"]
    identifier = run_dir / "identifier.safetensors"
    if identifier.is_file():
        lines.append(f"  identifier  {identifier}")
    grids = sorted((run_dir / "images").glob("*.png"), key=lambda p: p.stat().st_mtime)
    if grids:
        lines.append(f"  grid        {grids[-1]}")
    if any((run_dir / "plots").glob("*.png")):
        lines.append(f"  plots       {run_dir / 'plots'}")
    reports = sorted((run_dir / "metrics").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if reports:
        report = json.loads(reports[-1].read_text(encoding="utf-8"))
        shown = summary_metrics(report.get("metrics", {}))
        lines.append(f"  metrics     {report.get('stage')} at step {report.get('global_step')} on "
                     f"{report.get('images')} judged images:")
        lines += [f"              {item}" for item in shown]
        lines.append(f"              (every metric: {reports[-1]})")
    return lines


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
