"""``make-data``: an action folder in the project's layout, rendered from the toy world.

Why: ADI's hard case is exemplars whose context co-occurs with the action (every jumper wears
the same striped red shirt on the same beach), so plain textual inversion learns "striped red on
a beach" along with the jump. The folder reproduces that case, and because the world is exact it
also gives, for each exemplar, the action-different partner ADI needs: the same spec (subject,
background, colour, pattern, position, scale, mirror, jitter seed) with only the pose changed,
linked by ``pair_id``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..io import atomic_dir, atomic_save_image
from .world import ACTIONS, BACKGROUNDS, COLOURS, HUMANS, PATTERNS, Spec, caption, render

DEFAULT_EXEMPLAR_SUBJECTS = ("man", "woman", "child")


def exemplar_specs(action: str, num_exemplars: int, subjects, seed: int, background: str | None = None,
                   pattern: str | None = None, colour: str | None = None) -> list[tuple[Spec, Spec]]:
    """(exemplar, action-different partner) specs sharing one co-occurring context."""
    if action not in ACTIONS:
        raise ValueError(f"unknown toy action {action!r}; known: {', '.join(ACTIONS)}")
    if num_exemplars < 2:
        raise ValueError("num_exemplars must be >= 2 (context-different partners are other exemplars)")
    rng = random.Random(f"toy-data/{seed}/{action}")
    background = background or rng.choice(list(BACKGROUNDS))
    pattern = pattern or "striped"
    colour = colour or rng.choice(list(COLOURS))
    others = [a for a in ACTIONS if a != action]
    rng.shuffle(others)
    pairs = []
    for i in range(num_exemplars):
        spec = Spec(subject=subjects[i % len(subjects)], action=action, colour=colour, pattern=pattern,
                    background=background, x=rng.uniform(-0.12, 0.12), scale=rng.uniform(0.78, 1.0),
                    mirror=rng.random() < 0.5, seed=rng.randrange(2**31))
        pairs.append((spec, spec.with_action(others[i % len(others)])))
    return pairs


def make_action_folder(out: str | Path, action: str = "jumping", num_exemplars: int = 6, subjects=None,
                       seed: int = 0, size: int = 32, overwrite: bool = False, background: str | None = None,
                       pattern: str | None = None, colour: str | None = None) -> Path:
    """Write ``out`` (images + ``metadata.jsonl``); built in a temp sibling and renamed into place.

    Metadata keys: file_name, action, subject, context (the shared background), pair_id (one per
    exemplar, shared with its partner), caption (every factor named), plus ``spec`` (all factors).
    """
    subjects = list(subjects or DEFAULT_EXEMPLAR_SUBJECTS)
    bad = [s for s in subjects if s not in HUMANS]
    if bad:
        raise ValueError(f"exemplar subjects must be human-like ({', '.join(HUMANS)}), got {bad}")
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    rows = []
    with atomic_dir(out) as tmp:
        for i, pair in enumerate(exemplar_specs(action, num_exemplars, subjects, seed, background, pattern, colour)):
            for role, spec in zip(("exemplar", "action_different"), pair):
                name = f"{i:02d}_{spec.subject}_{spec.action}.png"
                atomic_save_image(render(spec, size), tmp / name)
                rows.append(dict(file_name=name, action=spec.action, subject=spec.subject, context=spec.background,
                                 pair_id=f"{spec.subject}-{i:02d}", caption=caption(spec), role=role,
                                 spec=spec.as_dict()))
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def ensure_action_folder(root: str | Path, action: str, **kwargs) -> Path:
    """``root`` if it already holds ``metadata.jsonl``, else export it (for a data-module hook)."""
    root = Path(root)
    if (root / "metadata.jsonl").is_file():
        return root
    return make_action_folder(root, action=action, **kwargs)
