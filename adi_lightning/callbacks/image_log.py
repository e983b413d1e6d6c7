"""ImageGridCallback: seeded image grids from validation, test and predict, written atomically.

Rows are prompts, columns are seeds. Each grid is a PNG in ``<run dir>/images/`` with a JSON
sidecar naming its rows and columns, and goes to W&B when a ``WandbLogger`` is attached.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from PIL import Image

from adi_lightning.io import atomic_save_image, atomic_write_json

log = logging.getLogger(__name__)


def image_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Tile equally sized images row by row (the last row may be short)."""
    if not images:
        raise ValueError("no images to tile")
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


class ImageGridCallback(L.Callback):
    """Collects generated images per stage and writes one labelled grid per epoch."""

    def __init__(self) -> None:
        self._items: list[tuple[str, int, Image.Image]] = []

    def _collect(self, outputs) -> None:
        if outputs:
            self._items.extend(zip(outputs["prompt"], outputs["seed"], outputs["image"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(outputs)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "validation")

    def on_test_epoch_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "predict")

    def _write(self, trainer, pl_module, stage: str) -> Path | None:
        items, self._items = self._items, []
        if not items or not trainer.is_global_zero or trainer.sanity_checking:
            return None
        prompts = list(dict.fromkeys(p for p, _, _ in items))
        seeds = list(dict.fromkeys(s for _, s, _ in items))
        by_key = {(p, s): img for p, s, img in items}
        blank = Image.new("RGB", items[0][2].size, "white")
        cells = [by_key.get((p, s), blank) for p in prompts for s in seeds]
        grid = image_grid(cells, len(prompts), len(seeds))
        name = f"{stage}_step{trainer.global_step:06d}"
        folder = pl_module.run_dir / "images"
        path = atomic_save_image(grid, folder / f"{name}.png")
        atomic_write_json(folder / f"{name}.json", {"rows_prompts": prompts, "columns_seeds": seeds,
                                                    "guidance_scale": pl_module.hparams.guidance_scale,
                                                    "num_inference_steps": pl_module.hparams.num_inference_steps})
        if stage == "predict":
            for prompt, seed, image in items:
                atomic_save_image(image, folder / stage / f"{prompts.index(prompt):03d}_seed{seed}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"{stage}/grid", images=[grid], caption=[" | ".join(prompts)], step=trainer.global_step)
        log.info("%s grid written to %s", stage, path)
        return path
