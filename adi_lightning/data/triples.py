"""Training triples (anchor, context-different, action-different) and prompt/seed grids.

ADI learns an action identifier from the gradient difference between an anchor and two
partners: a *context-different* image (same action, other subject/scene) whose shared
gradient channels carry the action, and an *action-different* image (same subject/scene,
other action) whose shared channels carry the appearance to be masked out. Partner
candidates are computed once at construction so every layout problem surfaces at setup;
the per-item choice is random but a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .layout import DataLayoutError, ImageRecord, open_rgb, records_of_action, verify_images

ActionDifferent = Literal["require", "other_action"]
ContextPartners = Literal["auto", "exemplars", "pool", "pool_and_exemplars"]
CONTEXT_PARTNERS: tuple[str, ...] = ("auto", "exemplars", "pool", "pool_and_exemplars")
ROLES = ("anchor", "context_different", "action_different")

__all__ = [
    "ROLES",
    "ActionTripleDataset",
    "PromptSeedDataset",
    "TriplePlan",
    "image_key",
    "load_image",
    "triple_key",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def triple_key(seed: int, index: int) -> int:
    """Mix ``(seed, index)`` into a key in ``[0, 2**62)`` (splitmix64; same in every process).

    The key seeds the generator that picks an item's partners, flip and template, so an item
    is reproducible on any rank or worker regardless of sampling order.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 2


def image_key(path: str, resolution: int) -> int:
    """A stable 63-bit key of one image file at one resolution, the same in every process
    (Python's ``hash`` is salted per process; DataLoader workers and DDP ranks need one key)."""
    digest = hashlib.blake2b(f"{path}\0{int(resolution)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def load_image(path, resolution: int) -> torch.Tensor:
    """RGB (upright, transparency on white, 16 bits scaled: :func:`open_rgb`), shorter side resized
    to ``resolution`` (bicubic), center crop; ``[3, R, R]`` in [-1, 1]."""
    img = open_rgb(path)
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BICUBIC)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class TriplePlan:
    """What item ``index`` is made of: records in role order, flip decision, template index."""

    index: int
    key: int
    records: tuple[ImageRecord, ...]
    flip: bool
    template_index: int


def _describe_search(anchor: ImageRecord) -> str:
    parts = [f"subject={anchor.subject!r}"]
    if anchor.pair_id is not None:
        parts.append(f"pair_id={anchor.pair_id!r}")
    elif anchor.context is not None:
        parts.append(f"context={anchor.context!r}")
    return ", ".join(parts)


def _strict_action_partners(anchor: ImageRecord, others: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Same subject, and same pair_id (if the anchor has one) else same context (if any)."""
    out = [r for r in others if r.subject == anchor.subject]
    if anchor.pair_id is not None:
        out = [r for r in out if r.pair_id == anchor.pair_id]
    elif anchor.context is not None:
        out = [r for r in out if r.context == anchor.context]
    return out


def _context_partners(anchor: ImageRecord, target: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Other images of the action, best tier first: other subject and context, other subject, any."""
    others = [r for r in target if r.file_name != anchor.file_name]
    other_subject = [r for r in others if r.subject != anchor.subject]
    best = [r for r in other_subject if anchor.context is None or r.context != anchor.context]
    return best or other_subject or others


class ActionTripleDataset(Dataset):
    """Triples of the target action for ADI training.

    Args:
        records: All records of the folder (see :func:`read_action_folder`).
        action: The target action; anchors and context-different partners show it.
        resolution: Square output size in pixels.
        action_different: ``"require"``: the action-different partner must share the anchor's
            subject (and pair_id, else context, when the anchor has them) -- the paper's
            setting. ``"other_action"``: prefer those, else fall back to any image of another
            action (weaker: appearance differs too, so less of it is masked out).
        with_partners: If False, items hold the anchor only (plain textual inversion /
            no masking) and no partner images are needed.
        context_partners: Where context-different partners come from. ``exemplars``: the other
            exemplars of the action. ``pool``: the folder's context pool (images of the action
            marked ``context_pool: true``: partners only, never anchors or targets), so the
            partner can differ in appearance when every exemplar shares one. ``pool_and_exemplars``:
            both. ``auto``: the pool when the action has one, else the exemplars.
        repeats: Passes over the anchors per epoch; ``len = num_anchors * repeats``.
        flip_p: Probability of one horizontal flip applied to all members of a triple.
        prompt_templates: Templates with one ``{}`` where the placeholder goes.
        seed: Mixed with the item index (:func:`triple_key`) to pick partners/flip/template.

    Raises:
        DataLayoutError: Action absent, too few images, missing partners, corrupt images.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        action: str,
        resolution: int,
        action_different: ActionDifferent = "require",
        with_partners: bool = True,
        context_partners: ContextPartners = "auto",
        repeats: int = 1,
        flip_p: float = 0.5,
        prompt_templates: Sequence[str] = ("a photo of a person {}",),
        seed: int = 0,
    ) -> None:
        if action_different not in ("require", "other_action"):
            raise ValueError(f"action_different must be 'require' or 'other_action', "
                             f"got {action_different!r}")
        if context_partners not in CONTEXT_PARTNERS:
            raise ValueError(f"context_partners must be one of {CONTEXT_PARTNERS}, got {context_partners!r}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if not prompt_templates:
            raise ValueError("prompt_templates must not be empty")
        records = list(records)
        self.action = action
        self.resolution = int(resolution)
        self.action_different = action_different
        self.with_partners = bool(with_partners)
        self.repeats = int(repeats)
        self.flip_p = float(flip_p)
        self.prompt_templates = list(prompt_templates)
        self.seed = int(seed)

        target = records_of_action(records, action)
        pool = records_of_action(records, action, pool=True)
        self.anchors: tuple[ImageRecord, ...] = tuple(target)
        self.context_partners = context_partners
        self.context_source = context_partners if context_partners != "auto" else ("pool" if pool else "exemplars")
        self.context_candidates: tuple[tuple[ImageRecord, ...], ...] = ()
        self.action_candidates: tuple[tuple[ImageRecord, ...], ...] = ()
        used: dict[str, ImageRecord] = {r.file_name: r for r in target}
        if self.with_partners:
            self.context_candidates = self._context_candidates(target, pool)
            self.action_candidates = self._action_partners(records, target)
            for cands in self.context_candidates + self.action_candidates:
                used.update((r.file_name, r) for r in cands)
        verify_images(used.values())

    def _context_candidates(self, target: list[ImageRecord], pool: list[ImageRecord]):
        where = target[0].path_of_metadata
        if self.context_source in ("pool", "pool_and_exemplars") and not pool:
            raise DataLayoutError(
                f"{where}: context_partners={self.context_source!r} but action {self.action!r} has no "
                "context-pool image (a metadata line with \"context_pool\": true)")
        if self.context_source == "pool":
            return tuple(tuple(pool) for _ in target)
        if self.context_source == "exemplars" and len(target) < 2:
            raise DataLayoutError(
                f"{target[0].where}: action {self.action!r} has only 1 exemplar "
                f"({target[0].file_name!r}); a context-different partner needs at least 2, or a context pool")
        extra = tuple(pool) if self.context_source == "pool_and_exemplars" else ()
        return tuple(tuple(_context_partners(a, target)) + extra for a in target)

    def _action_partners(self, records: list[ImageRecord], target: list[ImageRecord]):
        others = [r for r in records if r.action != self.action]
        if not others:
            raise DataLayoutError(
                f"{target[0].path_of_metadata}: no image of an action other than {self.action!r}; "
                f"action-different partners need images of another action (or train without "
                f"masking: model.mask_threshold=1.0)")
        result, missing = [], []
        for anchor in target:
            cands = _strict_action_partners(anchor, others)
            if not cands and self.action_different == "other_action":
                cands = others
            if not cands:
                missing.append(anchor)
            result.append(tuple(cands))
        if missing:
            first = missing[0]
            more = ""
            if len(missing) > 1:
                names = ", ".join(repr(a.file_name) for a in missing[1:6])
                more = f"; {len(missing) - 1} more anchor(s) lack one too: {names}"
                more += ", ..." if len(missing) > 6 else ""
            raise DataLayoutError(
                f"{first.where}: anchor {first.file_name!r} has no action-different partner "
                f"(searched images of another action with {_describe_search(first)}) under "
                f"action_different='require'; add such images or use 'other_action'{more}")
        return tuple(result)

    def anchor_without_context_difference(self) -> ImageRecord | None:
        """The first anchor whose context-different candidates all share its ``subject`` and
        ``context`` (by the metadata's labels: a folder whose exemplars are all one subject in one
        context, without a context pool), or None. Such a partner differs from the anchor in
        nothing ADI's context test is meant to remove (:func:`adi_lightning.checks.check_data_fits_model`)."""
        for anchor, cands in zip(self.anchors, self.context_candidates):
            if all((c.subject, c.context) == (anchor.subject, anchor.context) for c in cands):
                return anchor
        return None

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    def __len__(self) -> int:
        return self.num_anchors * self.repeats

    def plan(self, index: int) -> TriplePlan:
        """The deterministic choices for item ``index`` (no image loading).

        Indices past ``len(self)`` are the same items in later epochs (the training sampler
        emits ``epoch * len + i``): same anchor, fresh flip, template and partners.
        """
        if index < 0:
            raise IndexError(f"index {index} out of range for {len(self)} items")
        key = triple_key(self.seed, index)
        g = torch.Generator().manual_seed(key)
        # Flip and template first, so they do not depend on with_partners.
        flip = bool(torch.rand((), generator=g).item() < self.flip_p)
        template_index = int(torch.randint(len(self.prompt_templates), (), generator=g))
        a = index % len(self) % self.num_anchors
        chosen = [self.anchors[a]]
        if self.with_partners:
            for cands in (self.context_candidates[a], self.action_candidates[a]):
                chosen.append(cands[int(torch.randint(len(cands), (), generator=g))])
        return TriplePlan(index, key, tuple(chosen), flip, template_index)

    def __getitem__(self, index: int) -> dict:
        plan = self.plan(int(index))
        pixels = torch.stack([load_image(r.path, self.resolution) for r in plan.records])
        if plan.flip:
            pixels = pixels.flip(-1)
        return {
            "pixel_values": pixels,
            "template": self.prompt_templates[plan.template_index],
            "index": plan.index,
            "key": plan.key,
            # For the model's latent cache: which image each role is (stable across processes)
            # and whether it was flipped.
            "image_key": torch.tensor([image_key(str(r.path), self.resolution) for r in plan.records]),
            "flip": plan.flip,
        }


class PromptSeedDataset(Dataset):
    """Cartesian product of prompts and seeds (prompt-major) for seeded image generation.

    With ``subjects`` (one per prompt), items also carry the prompted subject for the judges.
    """

    def __init__(self, prompts: Sequence[str], seeds: Sequence[int], subjects: Sequence[str] | None = None) -> None:
        self.prompts = list(prompts)
        self.seeds = [int(s) for s in seeds]
        if subjects is not None and len(subjects) != len(self.prompts):
            raise ValueError("one subject per prompt")
        self.subjects = list(subjects) if subjects is not None else None

    def __len__(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        p, s = divmod(int(index), len(self.seeds))
        item = {"prompt": self.prompts[p], "seed": self.seeds[s], "prompt_index": p, "seed_index": s}
        if self.subjects is not None:
            item["subject"] = self.subjects[p]
        return item
