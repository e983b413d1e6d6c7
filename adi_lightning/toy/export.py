"""``make-data``: an action folder in the project's layout, rendered from the toy world.

Why: ADI's hard case is exemplars whose context co-occurs with the action (every jumper wears
the same striped red shirt on the same beach), so plain textual inversion learns "striped red on
a beach" along with the jump. The folder reproduces that case, and because the world is exact it
also gives, for each exemplar, the action-different partner ADI needs: the same spec (subject,
background, colour, pattern, position, scale, mirror, jitter seed) with only the pose changed,
linked by ``pair_id``.

``difficulty`` grades the case. ``shared_no_pool``: the hard case alone (the folder as written
before difficulties existed). ``shared``: the same exemplars plus a *context pool*, images of the
action in other colours, pattern and backgrounds, marked ``context_pool: true``; they are
context-different partners only (never anchors), so ADI's context test can see appearance even
though every exemplar shares one. ``diverse``: every exemplar has its own appearance (the easy case).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from ..io import atomic_dir, atomic_save_image
from ..paths import TOY_DIFFICULTIES as DIFFICULTIES, is_owned
from .world import ACTIONS, BACKGROUNDS, COLOURS, HUMANS, PATTERNS, Spec, caption, render

DEFAULT_EXEMPLAR_SUBJECTS = ("man", "woman", "child")
FOLDER_INFO = "toy_folder.json"  # beside metadata.jsonl: how the folder was made (difficulty, seed, ...)
LEGACY_DIFFICULTY = "shared_no_pool"  # a folder without FOLDER_INFO predates difficulties


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


def _spread(n: int, colours: list, patterns: list, backgrounds: list) -> list[tuple[str, str, str]]:
    """``n`` (colour, pattern, background) tuples, each value used as evenly as the counts allow;
    the background shifts by one per colour cycle (a Latin square) so the tuples stay distinct."""
    nc, nb = len(colours), len(backgrounds)
    return [(colours[i % nc], patterns[i % len(patterns)], backgrounds[(i + i // nc) % nb]) for i in range(n)]


def diverse_specs(pairs: list[tuple[Spec, Spec]], seed: int, action: str) -> list[tuple[Spec, Spec]]:
    """``pairs`` with a distinct appearance per exemplar (position, pose jitter and partners kept)."""
    rng = random.Random(f"toy-data/{seed}/{action}/diverse")
    looks = _spread(len(pairs), rng.sample(list(COLOURS), len(COLOURS)), list(PATTERNS),
                    rng.sample(list(BACKGROUNDS), len(BACKGROUNDS)))
    if len(set(looks)) < len(looks):
        raise ValueError(f"diverse: {len(pairs)} exemplars are too many for distinct looks")
    return [tuple(replace(s, colour=c, pattern=p, background=b) for s in pair) for pair, (c, p, b) in zip(pairs, looks)]


def pool_specs(shared: Spec, num_pool: int, subjects, seed: int) -> list[Spec]:
    """Context pool: the action in every colour and background but the exemplars' and the other pattern.

    Drawn from its own RNG stream so the exemplars stay those of ``shared_no_pool`` for a seed.
    """
    rng = random.Random(f"toy-data/{seed}/{shared.action}/pool")
    colours = rng.sample([c for c in COLOURS if c != shared.colour], len(COLOURS) - 1)
    backgrounds = rng.sample([b for b in BACKGROUNDS if b != shared.background], len(BACKGROUNDS) - 1)
    patterns = [p for p in PATTERNS if p != shared.pattern]
    return [Spec(subject=subjects[j % len(subjects)], action=shared.action, colour=c, pattern=p, background=b,
                 x=rng.uniform(-0.12, 0.12), scale=rng.uniform(0.78, 1.0), mirror=rng.random() < 0.5,
                 seed=rng.randrange(2**31))
            for j, (c, p, b) in enumerate(_spread(num_pool, colours, patterns, backgrounds))]


def _row(name: str, spec: Spec, pair_id: str, role: str) -> dict:
    row = dict(file_name=name, action=spec.action, subject=spec.subject, context=spec.background, pair_id=pair_id,
               caption=caption(spec), role=role, spec=spec.as_dict(),
               attributes=dict(colour=spec.colour, pattern=spec.pattern, background=spec.background))
    if role == "context_pool":
        row["context_pool"] = True
    return row


def make_action_folder(out: str | Path, action: str = "jumping", num_exemplars: int = 6, subjects=None,
                       seed: int = 0, size: int = 32, overwrite: bool = False, background: str | None = None,
                       pattern: str | None = None, colour: str | None = None, difficulty: str = "shared",
                       num_pool: int = 6) -> Path:
    """Write ``out`` (images, ``metadata.jsonl``, ``toy_folder.json``); built in a temp sibling, renamed.

    ``out`` must not exist, unless ``overwrite`` and it carries the ownership marker this function
    writes (``adi_lightning.paths.OWNER_MARKER``): a folder this project did not write is never
    replaced (FileExistsError naming what it holds).

    Metadata keys: file_name, action, subject, context (the background), pair_id (one per exemplar,
    shared with its partner; its own for a pool image), caption (every factor named), role
    (exemplar / action_different / context_pool), spec (all factors), attributes (colour, pattern,
    background), and ``context_pool: true`` on pool images only.
    """
    subjects = list(subjects or DEFAULT_EXEMPLAR_SUBJECTS)
    bad = [s for s in subjects if s not in HUMANS]
    if bad:
        raise ValueError(f"exemplar subjects must be human-like ({', '.join(HUMANS)}), got {bad}")
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; known: {', '.join(DIFFICULTIES)}")
    if difficulty == "diverse" and (background or pattern or colour):
        raise ValueError("background/pattern/colour fix the shared appearance; not with difficulty='diverse'")
    if num_pool < 0:
        raise ValueError(f"num_pool must be >= 0, got {num_pool}")
    out = Path(out)
    _check_replaceable(out, overwrite)
    pairs = exemplar_specs(action, num_exemplars, subjects, seed, background, pattern, colour)
    pool = pool_specs(pairs[0][0], num_pool, subjects, seed) if difficulty == "shared" else []
    if difficulty == "diverse":
        pairs = diverse_specs(pairs, seed, action)
    items = [(f"{i:02d}_{s.subject}_{s.action}.png", s, f"{pair[0].subject}-{i:02d}", role)
             for i, pair in enumerate(pairs) for role, s in zip(("exemplar", "action_different"), pair)]
    items += [(f"pool{j:02d}_{s.subject}_{s.action}.png", s, f"pool-{j:02d}", "context_pool")
              for j, s in enumerate(pool)]
    info = dict(action=action, difficulty=difficulty, seed=seed, num_exemplars=num_exemplars, num_pool=len(pool),
                subjects=subjects, size=size)
    with atomic_dir(out, "toy action folder") as tmp:
        for name, spec, _, _ in items:
            atomic_save_image(render(spec, size), tmp / name)
        rows = [_row(*item) for item in items]
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tmp / FOLDER_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """An earlier toy folder is replaced only with ``overwrite``; a folder (or file) this project did
    not write is refused by :func:`adi_lightning.io.atomic_dir`, with or without it."""
    if out.is_dir() and is_owned(out) and not overwrite:
        raise FileExistsError(f"{out} already holds a toy folder written earlier; choose another --out")


def folder_difficulty(root: str | Path) -> str:
    """The difficulty recorded in ``root/toy_folder.json``; ``shared_no_pool`` for older folders."""
    path = Path(root) / FOLDER_INFO
    return json.loads(path.read_text(encoding="utf-8"))["difficulty"] if path.is_file() else LEGACY_DIFFICULTY


def ensure_action_folder(root: str | Path, action: str, repair: bool = False, **kwargs) -> Path:
    """``root`` if it already holds a sound toy folder of the asked difficulty, else export it.

    Sound: ``metadata.jsonl`` reads (:func:`adi_lightning.data.read_action_folder`: every image it
    lists is there) and ``toy_folder.json`` records the asked difficulty. With ``repair`` (the
    project cache, ``adi_lightning.paths.toy_cache_dir``), an unsound folder that this project
    wrote is exported again, atomically, with one line on stderr; one it did not write is refused,
    naming the command that clears the way. Without ``repair`` an unsound folder is refused:
    reusing it would silently train on another case.
    """
    root = Path(root)
    wanted = kwargs.get("difficulty", "shared")
    problem = toy_folder_problem(root, wanted) if root.exists() else None
    if root.exists() and problem is None:
        return root
    if problem is not None and not repair:
        raise ValueError(f"toy folder {root} {problem}; remove it or pass another folder")
    if problem is not None and not (root.is_dir() and is_owned(root)):
        raise ValueError(f"toy cache folder {root} {problem}, and adi_lightning did not write it, so it is "
                         f"never replaced; move it away (mv {root} {root}.old) and run the command again")
    if problem is not None:
        print(f"adi_lightning: the toy folder {root} {problem}; exporting it again", file=sys.stderr)
    return make_action_folder(root, action=action, overwrite=problem is not None, **kwargs)


def toy_folder_problem(root: str | Path, difficulty: str) -> str | None:
    """What makes ``root`` unusable as a toy folder of ``difficulty`` (a phrase), or None."""
    from ..data.layout import DataLayoutError, read_action_folder

    root = Path(root)
    if not (root / "metadata.jsonl").is_file():
        return "has no metadata.jsonl"
    try:
        read_action_folder(root)
        found = folder_difficulty(root)
    except DataLayoutError as err:
        return f"is damaged ({err})"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"is damaged ({FOLDER_INFO}: {err})"
    if found != difficulty:
        return f"was written with difficulty {found!r}, asked for {difficulty!r}"
    return None
