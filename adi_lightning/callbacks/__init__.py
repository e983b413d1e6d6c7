"""Cross-cutting training concerns, one callback each."""

from adi_lightning.callbacks.gradient_mask import GradientMaskCallback
from adi_lightning.callbacks.image_log import ImageGridCallback, image_grid

__all__ = ["GradientMaskCallback", "ImageGridCallback", "image_grid"]
