"""Judging generated images: action / subject accuracy, appearance and context leaks."""

from adi_lightning.evaluation.judges import CLIPJudge, Judge, Judgement, ToyJudge
from adi_lightning.evaluation.metrics import METRIC_NAMES, ActionBenchMetric

__all__ = ["METRIC_NAMES", "ActionBenchMetric", "CLIPJudge", "Judge", "Judgement", "ToyJudge"]
