"""``evaluate-backbone``: how well the toy pipeline renders every subject x action from text.

Why: ADI can only learn an action the frozen backbone can render, and a held-out pair shows how
far the backbone composes words it never saw together. Prompts use the real words
("a photo of a cat jumping"), several seeds each, generated in batches with DDIM + CFG, and
judged by the toy judges; seen and held-out pairs are reported apart. First the judges read fresh
renders after a round trip through the pipeline's own VAE: low accuracy there means the judges, not
the backbone, are what fails (they were trained on another VAE's round trips).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..io import atomic_save_image, atomic_write_json
from .world import ACTIONS, HELD_OUT, SUBJECTS, _article


def prompt_for(subject: str, action: str) -> str:
    return f"a photo of {_article(subject)} {subject} {action}"


def held_out_pairs(pipeline_dir: Path) -> set[tuple[str, str]]:
    """The pairs the pipeline never saw (from its ``toy_pretrain.json``; the world default otherwise)."""
    info = Path(pipeline_dir) / "toy_pretrain.json"
    if info.is_file():
        return {tuple(p) for p in json.loads(info.read_text())["held_out"]}
    return set(HELD_OUT)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, batch: int):
    """One image per (prompt, seed), in batches; image i depends only on its own prompt and seed.
    A progress bar (images, rate, ETA) replaces the pipeline's per-batch step bar."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    images = []
    with tqdm(total=len(prompts), desc="generating", unit="img") as bar:
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
            out = pipe(prompt=prompts[i:i + batch], generator=gens, num_inference_steps=steps,
                       guidance_scale=guidance_scale, output_type="pil")
            images += out.images
            bar.update(len(out.images))
    return images


def grid(images: dict[tuple[str, str], Image.Image], rows, cols, scale: int = 3, held=()) -> Image.Image:
    """Rows x columns of images with their labels; held-out cells are framed in red."""
    w, h = next(iter(images.values())).size
    cw, ch = w * scale, h * scale
    left, top = 70, 16
    canvas = Image.new("RGB", (left + cw * len(cols), top + ch * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        draw.text((left + j * cw + 2, 2), c[:11], fill="black")
    for i, r in enumerate(rows):
        draw.text((2, top + i * ch + ch // 2 - 5), r, fill="black")
        for j, c in enumerate(cols):
            x, y = left + j * cw, top + i * ch
            canvas.paste(images[(r, c)].resize((cw, ch), Image.Resampling.NEAREST), (x, y))
            if (r, c) in held:
                draw.rectangle([x, y, x + cw - 1, y + ch - 1], outline=(255, 0, 0), width=2)
    return canvas


ROUND_TRIP_IMAGES, ROUND_TRIP_SEED = 300, 30_000  # a render seed the judges never trained or were scored on


def judges_on_round_trips(judge, vae, n: int = ROUND_TRIP_IMAGES, seed: int = ROUND_TRIP_SEED) -> dict[str, float]:
    """Accuracy per factor (action, subject, background, pattern, colour) of ``judge`` on ``n`` fresh renders
    encoded by ``vae`` (a posterior sample) and decoded: whether the judges can read this VAE's images."""
    from .judges import accuracy, render_labelled, vae_round_trip

    x, labels = render_labelled(n, seed=seed, size=judge.size)
    return accuracy(judge.net, vae_round_trip(x, vae, torch.Generator().manual_seed(seed)), labels)


def evaluate_backbone(pipeline: str | Path, judges: str | Path, out: str | Path, seeds: int = 8, steps: int = 25,
                      guidance_scale: float = 4.0, batch: int = 80, subjects=SUBJECTS, actions=ACTIONS) -> dict:
    """Generate, judge, print the table, write ``metrics.json`` and ``grid.png`` into ``out``."""
    from ..backbone import load_pipeline
    from .judges import ToyJudges

    t0 = time.time()
    pipe = load_pipeline(str(pipeline))
    judge = ToyJudges(judges)
    held = held_out_pairs(Path(pipeline))
    round_trip = judges_on_round_trips(judge, pipe.vae)
    print(f"judges on {ROUND_TRIP_IMAGES} renders after this VAE's round trip: "
          + ", ".join(f"{k} {v:.1%}" for k, v in round_trip.items()))
    pairs = [(s, a) for s in subjects for a in actions]
    prompts = [prompt_for(s, a) for s, a in pairs for _ in range(seeds)]
    seed_list = [k for _ in pairs for k in range(seeds)]
    images = generate(pipe, prompts, seed_list, steps, guidance_scale, batch)
    print(f"[{time.time() - t0:6.1f}s] generated {len(images)} images ({steps} DDIM steps, CFG {guidance_scale})")
    pred = judge.predict(images)
    rows = []
    for n, (s, a) in enumerate(pairs):
        sl = slice(n * seeds, (n + 1) * seeds)
        rows.append(dict(subject=s, action=a, held_out=(s, a) in held,
                         action_acc=float(np.mean([p == a for p in pred["action"][sl]])),
                         subject_acc=float(np.mean([p == s for p in pred["subject"][sl]])),
                         both_acc=float(np.mean([p == a and q == s for p, q in zip(pred["action"][sl], pred["subject"][sl])]))))

    def summary(sel):
        return {k: float(np.mean([r[k] for r in sel])) if sel else None for k in ("action_acc", "subject_acc", "both_acc")} | {"pairs": len(sel)}

    metrics = dict(seen=summary([r for r in rows if not r["held_out"]]), held_out=summary([r for r in rows if r["held_out"]]),
                   per_action={a: summary([r for r in rows if r["action"] == a and not r["held_out"]]) for a in actions},
                   per_subject={s: summary([r for r in rows if r["subject"] == s and not r["held_out"]]) for s in subjects},
                   judges_on_vae_round_trips=round_trip | {"images": ROUND_TRIP_IMAGES},
                   pairs=rows, seeds=seeds, num_inference_steps=steps, guidance_scale=guidance_scale,
                   pipeline=str(pipeline), minutes=round((time.time() - t0) / 60, 2))
    print(f"{'combos':<10}{'pairs':>6}{'action acc':>12}{'subject acc':>13}{'both':>8}")
    for name in ("seen", "held_out"):
        m = metrics[name]
        if m["pairs"]:
            print(f"{name:<10}{m['pairs']:>6}{m['action_acc']:>12.1%}{m['subject_acc']:>13.1%}{m['both_acc']:>8.1%}")
    for s, a in sorted(held):
        r = next((r for r in rows if (r["subject"], r["action"]) == (s, a)), None)
        if r:
            print(f"  held out {s} {a}: action {r['action_acc']:.0%} subject {r['subject_acc']:.0%}")
    print("per action (seen): " + ", ".join(f"{a} {m['action_acc']:.0%}" for a, m in metrics["per_action"].items()))
    print("per subject (seen): " + ", ".join(f"{s} {m['subject_acc']:.0%}" for s, m in metrics["per_subject"].items()))
    out = Path(out)
    first = {pair: images[n * seeds] for n, pair in enumerate(pairs)}
    atomic_save_image(grid(first, list(subjects), list(actions), held=held), out / "grid.png")
    atomic_write_json(out / "metrics.json", metrics)
    print(f"[{time.time() - t0:6.1f}s] wrote {out / 'grid.png'} and {out / 'metrics.json'}")
    return metrics
