"""``python -m adi_lightning.tiny --out DIR [--sdxl]``: build the tiny pipeline (DIR/pipeline; with
``--sdxl`` the tiny SDXL pipeline, DIR/pipeline_xl) and data (DIR/data).

Why: ``experiments/tiny.yaml`` points at these two folders so a user can run the whole flow on CPU
in minutes without the hub. Each folder is built in a temporary sibling and renamed into place, so
an interrupted build never leaves a half folder that a later run would mistake for a complete one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..io import atomic_dir
from .dataset import build_tiny_action_folder
from ..conditioning import cross_attention_layers
from .pipeline import build_tiny_pipeline
from .sdxl import build_tiny_sdxl_pipeline

PIPELINE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
#: ``--sdxl``: the second text encoder and tokenizer as well.
SDXL_PIPELINE_FILES = (
    *PIPELINE_FILES,
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/tokenizer_config.json",
)


def pipeline_complete(path: Path, files: tuple[str, ...] = PIPELINE_FILES) -> bool:
    return all((path / f).is_file() for f in files)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines() if line.strip()]


def data_complete(path: Path) -> bool:
    if not (path / "metadata.jsonl").is_file():
        return False
    rows = _rows(path)
    return bool(rows) and all((path / r["file_name"]).is_file() for r in rows)


def _data_mismatch(path: Path, args: argparse.Namespace) -> str | None:
    """Why an existing complete data folder does not match the request (None if it does)."""
    from PIL import Image

    rows = _rows(path)
    with Image.open(path / rows[0]["file_name"]) as img:
        if img.size != (args.resolution, args.resolution):
            return f"images are {img.size[0]} px, not {args.resolution} px"
    have = {(r["subject"], r["action"]) for r in rows}
    want = {(s, a) for s in args.subjects for a in args.actions}
    return None if have == want else "its subjects/actions differ from the requested ones"


def build_atomically(target: Path, build: Callable[[Path], object]) -> None:
    """Run ``build(tmp)`` in a temp dir next to ``target``, then swap it into place."""
    with atomic_dir(target, "tiny pipeline or data") as tmp:
        build(tmp)


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _pipeline_resolution(path: Path) -> int:
    unet = json.loads((path / "unet/config.json").read_text())
    vae = json.loads((path / "vae/config.json").read_text())
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def _describe_pipeline(path: Path) -> str:
    from diffusers import UNet2DConditionModel

    # Built from the config only (random weights): enough to count attn2 layers, no loading cost.
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
    texts = [json.loads(f.read_text()) for f in sorted(path.glob("text_encoder*/config.json"))]
    return (
        f"attn2 layers L={len(cross_attention_layers(unet))}, "
        f"text width D={'+'.join(str(t['hidden_size']) for t in texts)}, "
        f"vocab {texts[0]['vocab_size']}, image {_pipeline_resolution(path)} px, "
        f"latent {unet.config.sample_size}, {_dir_mb(path):.1f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adi_lightning.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder that receives pipeline/ and data/")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels (multiple of 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete folders exist")
    parser.add_argument("--sdxl", action="store_true",
                        help="build the tiny SDXL pipeline (two text encoders) in DIR/pipeline_xl instead")
    parser.add_argument("--actions", nargs="+", default=["jumping", "standing", "waving"])
    parser.add_argument("--subjects", nargs="+", default=["red", "green", "blue", "yellow"])
    args = parser.parse_args(argv)

    start = time.perf_counter()
    pipe_dir, data_dir = args.out / ("pipeline_xl" if args.sdxl else "pipeline"), args.out / "data"
    build_pipeline, files = ((build_tiny_sdxl_pipeline, SDXL_PIPELINE_FILES) if args.sdxl
                             else (build_tiny_pipeline, PIPELINE_FILES))

    if pipeline_complete(pipe_dir, files) and not args.force:
        have = _pipeline_resolution(pipe_dir)
        if have != args.resolution:
            print(f"{pipe_dir} exists at {have} px, not {args.resolution} px: pass --force to rebuild",
                  file=sys.stderr)
            return 2
        print(f"pipeline: {pipe_dir} already complete, skipped (--force rebuilds)")
    else:
        build_atomically(
            pipe_dir, lambda tmp: build_pipeline(tmp, seed=args.seed, sample_size=args.resolution)
        )
        print(f"pipeline: built {pipe_dir}")
    print(f"  {_describe_pipeline(pipe_dir)}")

    if data_complete(data_dir) and not args.force:
        mismatch = _data_mismatch(data_dir, args)
        if mismatch:
            print(f"{data_dir} exists but {mismatch}: pass --force to rebuild", file=sys.stderr)
            return 2
        print(f"data: {data_dir} already complete, skipped (--force rebuilds)")
    else:
        build_atomically(
            data_dir,
            lambda tmp: build_tiny_action_folder(
                tmp, actions=args.actions, subjects=args.subjects, size=args.resolution, seed=args.seed
            ),
        )
        print(f"data: built {data_dir}")
    n = sum(1 for line in (data_dir / "metadata.jsonl").read_text().splitlines() if line.strip())
    print(f"  {n} images, {_dir_mb(data_dir):.2f} MB")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
