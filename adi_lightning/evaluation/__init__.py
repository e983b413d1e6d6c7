"""Judging generated images: action / subject accuracy, per-attribute and appearance leaks."""

from adi_lightning.evaluation.judges import CLIPJudge, Judge, Judgement, ToyJudge
from adi_lightning.evaluation.metrics import (
    METRIC_NAMES,
    ActionBenchMetric,
    clean_against,
    judge_rows,
    leak_names,
    metric_names,
    with_untrained,
    with_word,
)

__all__ = ["METRIC_NAMES", "ActionBenchMetric", "CLIPJudge", "clean_against", "Judge", "Judgement", "ToyJudge", "judge_rows",
           "leak_names", "metric_names", "with_untrained", "with_word"]
