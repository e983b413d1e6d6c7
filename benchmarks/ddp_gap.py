"""How far 2 DDP ranks x batch 1 drift from 1 rank x batch 2 (different kernels), against how far
training moved the identifier: the figures behind tests/test_ddp.py's bound.

    OMP_NUM_THREADS=1 python benchmarks/ddp_gap.py [--steps 4]

Prints, per (family, statistic): the max entry difference, the max movement from the initial rows,
their ratio, and two controls of real errors on SD absolute: one optimizer step lost (3 vs 4 steps),
and weight decay 0 instead of 0.01. Builds the tiny pipelines into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from adi_lightning.identifier import read_identifier

REPO = Path(__file__).resolve().parents[1]
CASES = [("sd", "absolute"), ("sd", "projection"), ("sdxl", "absolute")]


def fit(root: Path, pipeline: str, data: str, devices: int, batch: int, statistic: str, steps: int, *extra: str) -> torch.Tensor:
    args = [sys.executable, "-m", "adi_lightning", "fit", "--config", "experiments/tiny.yaml",
            f"--model.pretrained_model_name_or_path={pipeline}", f"--data.root={data}",
            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", "--trainer.val_check_interval=100",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
            f"--data.batch_size={batch}", "--data.repeats=4", "--model.weight_decay=0.01",
            f"--model.mask_statistic={statistic}", *extra]
    if devices > 1:
        args.append("--trainer.strategy=ddp")
    env = {k: v for k, v in os.environ.items() if k != "ADI_RUN_DIR"}
    subprocess.run(args, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), check=True, capture_output=True)
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return read_identifier(run / "identifier.safetensors")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from adi_lightning.module import ADIModule
    from adi_lightning.tiny import build_tiny_action_folder, build_tiny_pipeline, build_tiny_sdxl_pipeline

    work = Path(tempfile.mkdtemp(prefix="ddp_gap-"))
    pipelines = {"sd": str(build_tiny_pipeline(work / "pipeline")), "sdxl": str(build_tiny_sdxl_pipeline(work / "pipeline_xl"))}
    data = str(build_tiny_action_folder(work / "data"))
    print(f"torch {torch.__version__}, {args.steps} steps, tiny pipelines in {work}")
    for family, statistic in CASES:
        pipeline, runs = pipelines[family], work / f"{family}-{statistic}"
        ddp = fit(runs / "ranks2", pipeline, data, 2, 1, statistic, args.steps)
        batched = fit(runs / "batch2", pipeline, data, 1, 2, statistic, args.steps)
        moved = (ddp - ADIModule(pretrained_model_name_or_path=pipeline).identifier.embedding.detach()).abs().max().item()
        gap = (batched - ddp).abs().max().item()
        line = f"{family:4s} {statistic:10s} gap {gap:.3g}  movement {moved:.3g}  ratio {gap / moved:.3g}"
        if (family, statistic) == ("sd", "absolute"):
            lost = fit(runs / "lost", pipeline, data, 1, 2, statistic, args.steps - 1)
            decay = fit(runs / "decay", pipeline, data, 1, 2, statistic, args.steps, "--model.weight_decay=0.0")
            line += (f"  | controls: one step lost {(lost - batched).abs().max().item() / moved:.3g},"
                     f" weight decay 0 {(decay - batched).abs().max().item() / moved:.3g}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
