"""Data side of ADI: action folders, training triples, prompt/seed grids, the DataModule."""

from .datamodule import DEFAULT_PROMPT_TEMPLATES, ActionTripleDataModule
from .layout import (
    METADATA_FILE,
    DataLayoutError,
    ImageRecord,
    read_action_folder,
    records_of_action,
    verify_images,
)
from .sampler import GlobalBatchSampler
from .triples import ROLES, ActionTripleDataset, PromptSeedDataset, TriplePlan, load_image, triple_key

__all__ = [
    "DEFAULT_PROMPT_TEMPLATES",
    "METADATA_FILE",
    "ROLES",
    "ActionTripleDataModule",
    "ActionTripleDataset",
    "DataLayoutError",
    "GlobalBatchSampler",
    "ImageRecord",
    "PromptSeedDataset",
    "TriplePlan",
    "load_image",
    "read_action_folder",
    "records_of_action",
    "triple_key",
    "verify_images",
]
