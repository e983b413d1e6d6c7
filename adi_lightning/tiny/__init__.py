"""Tiny offline Stable Diffusion pipeline and synthetic action data, for tests and the CPU demo."""

from .dataset import build_tiny_action_folder
from .pipeline import DEFAULT_WORDS, build_tiny_pipeline
from .tokenizer import build_clip_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "build_clip_tokenizer",
    "build_tiny_action_folder",
    "build_tiny_pipeline",
]
