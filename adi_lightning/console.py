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

SUMMARY_METRICS = ("action_acc", "subject_acc", "clean_both_correct", "appearance_leak", "leak_colour")


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


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar for step-bounded runs: "epoch 1" instead of "Epoch 1/-2" (``max_epochs=-1``
    under ``max_steps``; the bar counts the epoch's batches), and no ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{f'epoch {current_epoch}':{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module):
        return _step_metrics(super().get_metrics(trainer, pl_module))


class StepTQDMProgressBar(TQDMProgressBar):
    """The tqdm bar without ``v_num`` (used where ``rich`` is not installed)."""

    def get_metrics(self, trainer, pl_module):
        return _step_metrics(super().get_metrics(trainer, pl_module))


def default_progress_bar() -> str:
    """Class path of the bar the CLI adds when the config names none."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return f"{__name__}.StepTQDMProgressBar"
    return f"{__name__}.StepRichProgressBar"


def run_summary(subcommand: str, run_dir: str | Path, seconds: float) -> list[str]:
    """The closing lines of a command: run folder, identifier, latest grid, latest judged metrics."""
    run_dir = Path(run_dir)
    lines = [f"adi_lightning: {subcommand} finished in {_duration(seconds)}", f"  run folder  {run_dir}"]
    identifier = run_dir / "identifier.safetensors"
    if identifier.is_file():
        lines.append(f"  identifier  {identifier}")
    grids = sorted((run_dir / "images").glob("*.png"), key=lambda p: p.stat().st_mtime)
    if grids:
        lines.append(f"  grid        {grids[-1]}")
    reports = sorted((run_dir / "metrics").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if reports:
        report = json.loads(reports[-1].read_text(encoding="utf-8"))
        values = report.get("metrics", {})
        shown = [f"{k} {values[k]:.2f}" for k in SUMMARY_METRICS
                 if isinstance(values.get(k), (int, float)) and not math.isnan(values[k])]
        lines.append(f"  metrics     {report.get('stage')} on {report.get('images')} judged images: {', '.join(shown)}")
        lines.append(f"              (every metric: {reports[-1]})")
    return lines


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
