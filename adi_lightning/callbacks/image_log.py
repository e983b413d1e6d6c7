"""ImageGridCallback: seeded image grids from validation, test and predict, written atomically.

Rows are prompts, columns are seeds. In validation and test grids each seed's image has the
untrained identifier's image of the same prompt and seed beside it (column ``seed S untrained``),
the judge's verdict under each image when a judge ran (EvaluationCallback adds it to the step
outputs; green: the prompted action and subject), and a strip of the training exemplars heads the grid. Each grid is a PNG in ``<run dir>/images/`` with a JSON
sidecar naming its rows and columns, and goes to W&B when a ``WandbLogger`` is attached. Under
DDP each rank generates its share of the (prompt, seed) pairs; rank zero gathers them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
from PIL import Image

from adi_lightning.io import atomic_save_image, atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedImage:
    prompt_index: int
    seed_index: int
    prompt: str
    seed: int
    image: Image.Image
    untrained: Image.Image | None = None  # the untrained identifier's image (validation, test)
    verdict: dict | None = None  # what the judge saw in ``image`` (EvaluationCallback), when one ran
    untrained_verdict: dict | None = None


LABEL_WIDTH = 240  # px of the prompt column; prompts wrap to it, never cut
FONT_SIZE = 14  # Pillow's scalable default font: at its size-10 default, spaces are 2 px and vanish
LINE_HEIGHT = FONT_SIZE + 4
HEADER = LINE_HEIGHT + 6  # px above the first row: the seeds


def label_font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap_label(text: str, draw, font, width: int) -> list[str]:
    """``text`` as lines no wider than ``width`` px (measured with ``font``), split at spaces; a
    word wider than a line is split by characters."""
    lines: list[str] = []
    for word in text.split():
        pieces = []
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            pieces.append(word[:cut])
            word = word[cut:]
        for piece in [*pieces, word]:
            candidate = f"{lines[-1]} {piece}" if lines else piece
            if lines and draw.textlength(candidate, font=font) <= width:
                lines[-1] = candidate
            else:
                lines.append(piece)
    return lines or [""]


def labelled_grid(images: list[Image.Image], row_labels: list[str], col_labels: list[str], min_cell: int = 128,
                  captions: list[tuple[str, str] | None] | None = None) -> Image.Image:
    """A grid with the prompt left of each row (wrapped, never cut) and a label above each column.

    Small images (the toy world's 32 px) are scaled up (nearest) so a person can see them; a row
    grows when its wrapped prompt is taller than the image. ``captions``: one ``(text, colour)`` or
    None per image, written under it (the judge's verdict).
    """
    from PIL import ImageDraw

    width, height = images[0].size
    scale = max(1, -(-min_cell // width))
    cell = (width * scale, height * scale)
    font = label_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, header = LINE_HEIGHT, HEADER
    caption_h = line_h + 2 if captions and any(captions) else 0
    wrapped = [wrap_label(text, measure, font, LABEL_WIDTH - 8) for text in row_labels]
    row_h = max(cell[1] + caption_h, *(len(lines) * line_h + 8 for lines in wrapped))
    grid = Image.new("RGB", (LABEL_WIDTH + cell[0] * len(col_labels), header + row_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        draw.text((LABEL_WIDTH + c * cell[0] + 4, 3), text, fill="black", font=font)
    for r, lines in enumerate(wrapped):
        top = header + r * row_h + (row_h - len(lines) * line_h) // 2
        for k, line in enumerate(lines):
            draw.text((4, top + k * line_h), line, fill="black", font=font)
    for i, image in enumerate(images):
        r, c = divmod(i, len(col_labels))
        left, top = LABEL_WIDTH + c * cell[0], header + r * row_h
        grid.paste(image.convert("RGB").resize(cell, Image.Resampling.NEAREST), (left, top))
        caption = captions[i] if captions else None
        if caption:
            draw.text((left + 4, top + cell[1] + 1), caption[0], fill=caption[1], font=font)
    return grid


def with_strip(grid: Image.Image, images: list[Image.Image], label: str, height: int = 64) -> Image.Image:
    """``grid`` headed by a strip of ``images`` (each ``height`` px high, nearest-scaled), ``label``
    left of it: the training exemplars above a validation grid."""
    from PIL import ImageDraw

    cells = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.NEAREST)
             for im in images]
    strip_w = LABEL_WIDTH + sum(c.width + 2 for c in cells)
    out = Image.new("RGB", (max(grid.width, strip_w), height + 8 + grid.height), "white")
    draw = ImageDraw.Draw(out)
    font = label_font()
    for k, line in enumerate(wrap_label(label, draw, font, LABEL_WIDTH - 8)):
        draw.text((4, 4 + k * LINE_HEIGHT), line, fill="black", font=font)
    left = LABEL_WIDTH
    for c in cells:
        out.paste(c, (left, 4))
        left += c.width + 2
    out.paste(grid, (0, height + 8))
    return out


#: At most this many training exemplars head a validation / test grid.
STRIP_EXEMPLARS = 8


def verdict_caption(verdict: dict | None, action: str | None, subject: str | None) -> tuple[str, str] | None:
    """``("jumping cat", colour)``: what the judge saw, green when action and subject are the prompted
    ones, red otherwise; None without a verdict."""
    if not verdict:
        return None
    right = verdict.get("action") == action and (not subject or verdict.get("subject") == subject)
    return f"{verdict.get('action')} {verdict.get('subject')}", "darkgreen" if right else "firebrick"


def _read(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def gather_objects(items: list, key) -> list:
    """Every rank's items on every rank, without the duplicates a padded sampler adds.

    ``all_gather_object`` works on gloo and NCCL alike; generation outputs are small.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        items = [item for part in parts for item in part]
    return list({key(item): item for item in items}.values())


class ImageGridCallback(L.Callback):
    """Collects generated images per stage and writes one grid per epoch on rank zero."""

    def __init__(self) -> None:
        self._items: list[GeneratedImage] = []
        self._subjects: dict[str, str | None] = {}  # prompt -> its evaluation subject, if any

    def _collect(self, outputs) -> None:
        if outputs:
            keys = ("prompt_index", "seed_index", "prompt", "seed", "image")
            n = len(outputs["image"])
            extra = [outputs.get(k) or [None] * n for k in ("untrained_image", "verdict", "untrained_verdict")]
            self._items.extend(GeneratedImage(*row) for row in zip(*(outputs[k] for k in keys), *extra))
            self._subjects.update(zip(outputs["prompt"], outputs.get("subject") or [None] * n))

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

    def _write(self, trainer, pl_module, stage: str):
        items, self._items = self._items, []
        if trainer.sanity_checking:
            return None
        if trainer.world_size > 1:
            items = gather_objects(items, key=lambda it: (it.prompt_index, it.seed_index))
        if not items or not trainer.is_global_zero:
            return None
        items.sort(key=lambda it: (it.prompt_index, it.seed_index))
        prompts = list(dict.fromkeys(it.prompt for it in items))
        seeds = list(dict.fromkeys(it.seed for it in sorted(items, key=lambda it: it.seed_index)))
        by_key = {(it.prompt, it.seed): it for it in items}
        blank = Image.new("RGB", items[0].image.size, "white")
        paired = stage != "predict" and all(it.untrained is not None for it in items)
        action = getattr(trainer.datamodule, "action", None) if trainer.datamodule is not None else None
        images, captions = [], []
        for p in prompts:
            subject = self._subjects.get(p)
            for s in seeds:
                it = by_key.get((p, s))
                images.append(it.image if it else blank)
                captions.append(verdict_caption(it.verdict if it else None, action, subject))
                if paired:
                    images.append(it.untrained if it else blank)
                    captions.append(verdict_caption(it.untrained_verdict if it else None, action, subject))
        columns = [label for s in seeds for label in ((f"seed {s}", f"seed {s} untrained") if paired else (f"seed {s}",))]
        self._subjects = {}
        grid = labelled_grid(images, prompts, columns, captions=captions if any(captions) else None)
        exemplars = list(getattr(trainer.datamodule, "exemplar_paths", []) or [])[:STRIP_EXEMPLARS]
        if stage != "predict" and exemplars:
            grid = with_strip(grid, [_read(path) for path in exemplars], "training exemplars")
        name = f"{stage}_step{trainer.global_step:06d}"
        folder = pl_module.run_dir / "images"
        path = atomic_save_image(grid, folder / f"{name}.png")
        atomic_write_json(folder / f"{name}.json", {
            "rows_prompts": prompts, "columns_seeds": seeds, "columns": columns,
            "exemplar_strip": [str(path) for path in exemplars] if stage != "predict" else [],
            "guidance_scale": pl_module.hparams.guidance_scale,
            "num_inference_steps": pl_module.hparams.num_inference_steps,
        })
        if stage == "predict":
            for it in items:
                atomic_save_image(it.image, folder / stage / f"{it.prompt_index:03d}_seed{it.seed}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"{stage}/grid", images=[grid], caption=[" | ".join(prompts)], step=trainer.global_step)
        log.info("%s grid written to %s", stage, path)
        return path
