"""Which one vector keeps the action: one-vector exports judged in the STOCK diffusers pipeline.

For a trained toy identifier (``identifier.safetensors`` of the main job, ``jump.yaml``), each
candidate one-vector export is loaded into a fresh stock ``StableDiffusionPipeline`` (the shipped
toy pipeline) with ``load_textual_inversion`` and draws "a photo of a <subject> <A>" for the 7
unseen toy subjects x ``--seeds``; the toy judges score action and subject. The layer-wise
identifier itself (``adi_lightning.install_identifier``) and the untrained identifier (the
initializer word) are the two references. Candidates:

- ``mean``: the mean of the rows;
- ``row N``: every row of the file (``--rows``: a subset);
- ``distill S``: :mod:`adi_lightning.distill` with S steps (``--steps``, several allowed),
  written by ``adi_lightning.export.export_identifier`` itself (the command's own path).

Each row of the table also gives the candidate's residual (:func:`adi_lightning.distill.residual`:
0 = the identifier's predictions, 1 = the untrained identifier's), the number
``python -m adi_lightning.export`` gates ``--lossy`` on.

    OMP_NUM_THREADS=1 python benchmarks/export_fidelity.py --identifier outputs/<run>/identifier.safetensors

Prints a table (and ``--json`` writes it). CPU: a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adi_lightning.toy.world import ACTIONS  # noqa: E402

UNSEEN = ("cat", "dog", "bear", "rabbit", "bird", "robot", "astronaut")


def stock_pipeline(path: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, token: str, seeds: list[int], guidance: float, steps: int) -> tuple[list, list[str]]:
    """One image per (unseen subject, seed), each from its own generator."""
    images, subjects = [], []
    for subject in UNSEEN:
        for seed in seeds:
            out = pipe(f"a photo of a {subject} {token}", generator=torch.Generator().manual_seed(seed),
                       num_inference_steps=steps, guidance_scale=guidance, output_type="pil")
            images.append(out.images[0])
            subjects.append(subject)
    return images, subjects


def judge(judges, images, subjects, action: str) -> dict:
    pred = judges.predict(images)
    acts = pred["action"]
    return {"action_acc": float(np.mean([a == action for a in acts])),
            "subject_acc": float(np.mean([p == s for p, s in zip(pred["subject"], subjects)])),
            "top_other": max(((a, acts.count(a)) for a in set(acts) if a != action), key=lambda x: x[1],
                             default=("-", 0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identifier", required=True)
    parser.add_argument("--action", default=None, help="the identifier's action (default: read from its run_info)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, nargs="+", default=[200], help="distillation budgets to measure")
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="rows to measure (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from adi_lightning import distill, install_identifier
    from adi_lightning.backbone import load_backbone
    from adi_lightning.conditioning import cross_attention_layers
    from adi_lightning.export import export_identifier, single_vector
    from adi_lightning.identifier import read_identifier, rows_for_layers, saved_layer_to_row
    from adi_lightning.toy import DEFAULT_GUIDANCE_SCALE, DEFAULT_INFERENCE_STEPS, toy_judges_path, toy_pipeline_path
    from adi_lightning.toy.judges import ToyJudges

    torch.set_num_threads(1)
    started = time.time()
    table, meta = read_identifier(args.identifier)
    token = meta.get("placeholder_token", "<A>")
    action = args.action or next((a for a in ACTIONS if a in str(Path(args.identifier).resolve())), None)
    run_info = Path(args.identifier).parent / "run_info.json"
    if action is None and run_info.is_file():
        action = json.loads(run_info.read_text()).get("config", {}).get("data", {}).get("action")
    if action not in ACTIONS:
        parser.error("--action: say which toy action the identifier learned")
    pipeline = str(toy_pipeline_path())
    judges = ToyJudges(toy_judges_path())
    gen = dict(guidance=DEFAULT_GUIDANCE_SCALE, steps=DEFAULT_INFERENCE_STEPS)
    results = []

    def record(name, row, vector=None, path=None, residual=None):
        pipe = stock_pipeline(pipeline)
        if name == "layer-wise":
            install_identifier(pipe, args.identifier)
        else:
            pipe.load_textual_inversion(str(path), token=token)  # the stock loader, the stock pipeline
        images, subjects = draw(pipe, token, args.seeds, **gen)
        scores = judge(judges, images, subjects, action)
        results.append({"candidate": name, "row": row, "residual": residual, **scores})
        print(f"[{time.time() - started:6.0f}s] {name:<14} action {scores['action_acc']:.2f} "
              f"subject {scores['subject_acc']:.2f}" + ("" if residual is None else f" residual {residual:.3f}"),
              flush=True)

    # One teacher for the residuals of mean / rows / untrained (the same draws export_identifier makes).
    family = load_backbone(pipeline)
    distill.prepare(family, token)
    rows, layer_to_row = rows_for_layers(args.identifier, table, meta, list(cross_attention_layers(family.unet)),
                                         family.identifier_dim)
    settings = distill.DistillSettings()
    teacher = distill.Teacher(family, rows, layer_to_row, distill.action_prompts(token), settings)
    untrained = family.initializer_row(meta["initializer_token"]).reshape(1, -1)

    with tempfile.TemporaryDirectory(prefix="export-fidelity-") as tmp:
        record("layer-wise", None, residual=0.0)

        def vector_file(name, vector):
            path = Path(tmp) / f"{name}.safetensors"
            save_file({token: vector.float().contiguous()}, str(path))
            return path

        record("untrained", None, path=vector_file("untrained", untrained), residual=1.0)
        mean = single_vector(table)
        record("mean", None, path=vector_file("mean", mean), residual=distill.residual(teacher, mean, untrained))
        file_paths = json.loads(meta["layer_paths"])
        file_rows = saved_layer_to_row(args.identifier, table.shape[0], len(file_paths)).tolist()
        for r in (range(table.shape[0]) if args.rows is None else args.rows):
            vector = single_vector(table, r)
            where = ",".join(p.replace("down_blocks.", "d").replace("up_blocks.", "u").replace("mid_block", "m")
                             .split(".attentions.")[0] for p, rr in zip(file_paths, file_rows) if rr == r)
            record(f"row {r} ({where})", r, path=vector_file(f"row{r}", vector),
                   residual=distill.residual(teacher, vector, untrained))
        for steps in args.steps:
            out = Path(tmp) / f"distill{steps}.safetensors"
            report = export_identifier(args.identifier, out, "ti", method="distill", pipeline=pipeline, lossy=True,
                                       settings=distill.DistillSettings(steps=steps), log=lambda *_: None)
            record(f"distill {steps}", None, path=out, residual=report.residual)

    print(f"\nexport fidelity: {Path(args.identifier)} (action {action}), stock StableDiffusionPipeline + "
          f"load_textual_inversion, {len(UNSEEN)} unseen subjects x seeds {args.seeds}, "
          f"CFG {gen['guidance']}, {gen['steps']} steps")
    print("| candidate | action acc | subject acc | most drawn other action | residual |")
    print("|---|---|---|---|---|")
    n = len(UNSEEN) * len(args.seeds)
    for r in results:
        other = f"{r['top_other'][0]} ({r['top_other'][1]}/{n})"
        print(f"| {r['candidate']} | {r['action_acc']:.2f} | {r['subject_acc']:.2f} | {other} | "
              f"{'-' if r['residual'] is None else format(r['residual'], '.3f')} |")
    print(f"wall {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"identifier": str(args.identifier), "action": action,
                                               "seeds": args.seeds, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
