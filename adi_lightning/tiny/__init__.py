"""Tiny offline Stable Diffusion (1.x-, SDXL-, SD3-) and FLUX-shaped pipelines and synthetic action data, for
tests and the CPU demo."""

from .dataset import build_tiny_action_folder
from .flux import build_tiny_flux_pipeline, build_tiny_flux_transformer
from .pipeline import DEFAULT_WORDS, build_tiny_pipeline
from .sd3 import build_tiny_sd3_pipeline, build_tiny_sd3_transformer
from .sdxl import build_tiny_sdxl_pipeline
from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_action_folder",
    "build_tiny_flux_pipeline",
    "build_tiny_flux_transformer",
    "build_tiny_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd3_transformer",
    "build_tiny_sdxl_pipeline",
]
