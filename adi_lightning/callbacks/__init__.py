"""Cross-cutting training concerns, one callback each."""

from adi_lightning.callbacks.evaluation import EvaluationCallback
from adi_lightning.callbacks.gradient_mask import GradientMaskCallback
from adi_lightning.callbacks.image_log import ImageGridCallback, labelled_grid
from adi_lightning.callbacks.optimizer_settings import OptimizerSettingsCallback
from adi_lightning.callbacks.rank_consistency import RankConsistencyCallback

__all__ = [
    "EvaluationCallback",
    "GradientMaskCallback",
    "ImageGridCallback",
    "OptimizerSettingsCallback",
    "RankConsistencyCallback",
    "labelled_grid",
]
