"""Cross-cutting training concerns, one callback each."""

from adi_lightning.callbacks.curves import CurvesCallback
from adi_lightning.callbacks.evaluation import EvaluationCallback
from adi_lightning.callbacks.failed_run import LAST_GOOD_FILE, LastGoodIdentifierCallback, run_results
from adi_lightning.callbacks.gradient_mask import GradientMaskCallback
from adi_lightning.callbacks.image_log import ImageGridCallback, labelled_grid
from adi_lightning.callbacks.multi_start import MultiStartCallback, large_t_anchor_loss
from adi_lightning.callbacks.optimizer_settings import OptimizerSettingsCallback
from adi_lightning.callbacks.preemption import STOPPED_NAME, PreemptionCallback
from adi_lightning.callbacks.rank_consistency import RankConsistencyCallback
from adi_lightning.callbacks.subject_words import SubjectWordsCallback
from adi_lightning.callbacks.validation_schedule import ValidationScheduleCallback

__all__ = ["LAST_GOOD_FILE", "CurvesCallback", "EvaluationCallback", "GradientMaskCallback", "ImageGridCallback", "LastGoodIdentifierCallback",
           "MultiStartCallback", "OptimizerSettingsCallback", "PreemptionCallback", "RankConsistencyCallback", "STOPPED_NAME",
           "SubjectWordsCallback", "ValidationScheduleCallback", "labelled_grid", "large_t_anchor_loss", "run_results"]
