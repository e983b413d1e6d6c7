"""A tiny synthetic action data folder (Hugging Face imagefolder layout) for tests and the CPU demo.

Why: ADI's triples need, for every exemplar, another subject doing the same action (context
different) and the same subject/context doing another action (action different). A grid of
subjects x actions gives both by construction. Each subject has its own figure colour and its own
background context (so subject and context are entangled, as with real exemplars), and each action
its own stick-figure pose, so the action is the only thing shared across a row.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

SUPERSAMPLE = 4

#: Figure colours of the known subjects.
SUBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "pink": (240, 120, 180),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}

#: Backgrounds (sky colour, ground colour); subject i gets context i modulo this list.
CONTEXTS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "park": ((170, 215, 240), (90, 150, 70)),
    "beach": ((120, 190, 235), (225, 205, 150)),
    "room": ((215, 200, 180), (140, 100, 70)),
    "street": ((190, 190, 200), (80, 80, 85)),
    "field": ((235, 225, 170), (160, 170, 60)),
}

_Pt = tuple[float, float]

# Poses in unit coordinates (x right, y down): head centre and polylines for torso, arms, legs.
_STAND = dict(
    head=(0.5, 0.22),
    torso=[(0.5, 0.30), (0.5, 0.58)],
    arms=[[(0.5, 0.36), (0.38, 0.56)], [(0.5, 0.36), (0.62, 0.56)]],
    legs=[[(0.5, 0.58), (0.42, 0.88)], [(0.5, 0.58), (0.58, 0.88)]],
)
POSES: dict[str, dict] = {
    "standing": _STAND,
    "jumping": dict(
        head=(0.5, 0.12),
        torso=[(0.5, 0.20), (0.5, 0.46)],
        arms=[[(0.5, 0.26), (0.30, 0.08)], [(0.5, 0.26), (0.70, 0.08)]],
        legs=[[(0.5, 0.46), (0.36, 0.58), (0.40, 0.72)], [(0.5, 0.46), (0.64, 0.58), (0.60, 0.72)]],
    ),
    "waving": dict(_STAND, arms=[[(0.5, 0.36), (0.38, 0.56)], [(0.5, 0.36), (0.66, 0.26), (0.72, 0.10)]]),
    "raising": dict(_STAND, arms=[[(0.5, 0.36), (0.40, 0.08)], [(0.5, 0.36), (0.60, 0.08)]]),
    "squatting": dict(
        head=(0.5, 0.40),
        torso=[(0.5, 0.48), (0.5, 0.70)],
        arms=[[(0.5, 0.54), (0.30, 0.56)], [(0.5, 0.54), (0.70, 0.56)]],
        legs=[[(0.5, 0.70), (0.32, 0.70), (0.36, 0.88)], [(0.5, 0.70), (0.68, 0.70), (0.64, 0.88)]],
    ),
    "kicking": dict(_STAND, legs=[[(0.5, 0.58), (0.44, 0.88)], [(0.5, 0.58), (0.86, 0.48)]]),
    "sitting": dict(
        head=(0.45, 0.34),
        torso=[(0.45, 0.42), (0.45, 0.68)],
        arms=[[(0.45, 0.48), (0.60, 0.60)], [(0.45, 0.48), (0.62, 0.56)]],
        legs=[[(0.45, 0.68), (0.70, 0.68), (0.70, 0.88)], [(0.45, 0.68), (0.72, 0.66), (0.74, 0.88)]],
    ),
    "handstand": dict(
        head=(0.5, 0.74),
        torso=[(0.5, 0.66), (0.5, 0.38)],
        arms=[[(0.5, 0.60), (0.40, 0.88)], [(0.5, 0.60), (0.60, 0.88)]],
        legs=[[(0.5, 0.38), (0.42, 0.08)], [(0.5, 0.38), (0.58, 0.08)]],
    ),
    "lying": dict(
        head=(0.18, 0.80),
        torso=[(0.26, 0.82), (0.56, 0.82)],
        arms=[[(0.32, 0.82), (0.46, 0.76)], [(0.32, 0.82), (0.46, 0.88)]],
        legs=[[(0.56, 0.82), (0.86, 0.78)], [(0.56, 0.82), (0.86, 0.86)]],
    ),
}


def _jitter(pose: dict, rng: random.Random, amount: float) -> dict:
    """Small seeded perturbation so images are not pixel-identical copies of a template."""
    dx, dy = rng.uniform(-amount, amount), rng.uniform(-amount, amount)

    def move(p: _Pt) -> _Pt:
        return (p[0] + dx + rng.uniform(-amount, amount) / 2, p[1] + dy + rng.uniform(-amount, amount) / 2)

    return dict(
        head=move(pose["head"]),
        torso=[move(p) for p in pose["torso"]],
        arms=[[move(p) for p in limb] for limb in pose["arms"]],
        legs=[[move(p) for p in limb] for limb in pose["legs"]],
    )


def draw_action(action: str, subject: str, context: str, size: int, rng: random.Random) -> Image.Image:
    """Render one stick figure (pose = action, colour = subject) over a background (= context)."""
    if action not in POSES:
        raise ValueError(f"unknown tiny action {action!r}; known: {sorted(POSES)}")
    if subject not in SUBJECT_COLOURS:
        raise ValueError(f"unknown tiny subject {subject!r}; known: {sorted(SUBJECT_COLOURS)}")
    if context not in CONTEXTS:
        raise ValueError(f"unknown tiny context {context!r}; known: {sorted(CONTEXTS)}")
    big = size * SUPERSAMPLE
    sky, ground = CONTEXTS[context]
    shade = rng.randint(-12, 12)
    sky = tuple(max(0, min(255, c + shade)) for c in sky)
    img = Image.new("RGB", (big, big), sky)
    draw = ImageDraw.Draw(img)
    horizon = int(big * rng.uniform(0.86, 0.92))
    draw.rectangle([0, horizon, big, big], fill=ground)

    colour = SUBJECT_COLOURS[subject]
    pose = _jitter(POSES[action], rng, 0.03)
    width = max(SUPERSAMPLE, big // 14)

    def px(p: _Pt) -> tuple[float, float]:
        return (p[0] * big, p[1] * big)

    for line in [pose["torso"], *pose["arms"], *pose["legs"]]:
        draw.line([px(p) for p in line], fill=colour, width=width, joint="curve")
    hx, hy = px(pose["head"])
    r = big * 0.08
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=colour)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def build_tiny_action_folder(
    out_dir: str | os.PathLike,
    actions: Sequence[str] = ("jumping", "standing", "waving"),
    subjects: Sequence[str] = ("red", "green", "blue", "yellow"),
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``{subject}_{action}.png`` for every subject x action plus ``metadata.jsonl``; return the folder.

    Each metadata line: ``file_name``, ``action``, ``subject``, ``context`` (the subject's
    background), ``pair_id`` (``f"{subject}-{context}"``: images sharing it differ only by action)
    and ``caption`` ("a photo of a red person jumping"). Deterministic from ``seed``.
    """
    if len(set(actions)) != len(actions) or len(set(subjects)) != len(subjects):
        raise ValueError("actions and subjects must be unique")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contexts = list(CONTEXTS)
    rows = []
    for i, subject in enumerate(subjects):
        context = contexts[i % len(contexts)]
        for action in actions:
            rng = random.Random(f"{seed}/{subject}/{action}")
            name = f"{subject}_{action}.png"
            draw_action(action, subject, context, size, rng).save(out / name)
            rows.append(
                dict(
                    file_name=name,
                    action=action,
                    subject=subject,
                    context=context,
                    pair_id=f"{subject}-{context}",
                    caption=f"a photo of a {subject} person {action}",
                )
            )
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return out
