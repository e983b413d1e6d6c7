"""Judging generated images: action / subject accuracy, per-attribute and appearance leaks."""

from adi_lightning.evaluation.judges import CLIPJudge, Judge, Judgement, ToyJudge
from adi_lightning.evaluation.metrics import (
    METRIC_NAMES,
    ActionBenchMetric,
    judge_rows,
    leak_names,
    metric_names,
    with_untrained,
)

__all__ = ["METRIC_NAMES", "ActionBenchMetric", "CLIPJudge", "Judge", "Judgement", "ToyJudge", "judge_rows",
           "leak_names", "metric_names", "with_untrained"]
