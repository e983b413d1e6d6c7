"""Cross-cutting training concerns, one callback each."""

from adi_lightning.callbacks.evaluation import EvaluationCallback
from adi_lightning.callbacks.gradient_mask import GradientMaskCallback
from adi_lightning.callbacks.image_log import ImageGridCallback, labelled_grid
from adi_lightning.callbacks.rank_consistency import RankConsistencyCallback

__all__ = ["EvaluationCallback", "GradientMaskCallback", "ImageGridCallback", "RankConsistencyCallback", "labelled_grid"]
