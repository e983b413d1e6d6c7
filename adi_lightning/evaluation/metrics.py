"""ActionBench metrics: does ``<A>`` carry the action to a new subject without the exemplars?

Per generated image (prompted action A, prompted subject s) the judge names an action, a subject
and its appearance factors (e.g. background, pattern, colour). Each exemplar (anchor) image is a
dict of the attributes known for it, e.g. ``{"subject": "man", "colour": "yellow", ...}``.
:func:`judge_rows` holds the one copy of the per-image rules; :class:`ActionBenchMetric` counts
them (torchmetrics states summed over batches and DDP ranks) and turns them into rates:

- ``action_acc``: judged action == A. ``subject_acc``: judged subject == s. ``both_correct``: both.
- ``leak_<k>`` for k in {subject} and every judge factor: the judged value of k equals the value
  of k of some exemplar (for ``subject``: and is not s). NaN (not logged) when no exemplar has a
  value for k.
- ``appearance_leak``: the judged tuple of all appearance factors (the judge's factors that some
  exemplar has a value for) equals that tuple of one single exemplar (one having all of them).
  NaN when no appearance factor is known.
- ``clean_both_correct``: action and subject correct and no ``appearance_leak``; when no
  appearance factor is known it equals ``both_correct``.
- ``leak_pool_appearance``: the judged appearance tuple equals that of one context-pool image (a
  context-different partner only, never trained on) and of no exemplar: ADI's context test may
  swap the pool's looks in rather than remove the exemplars'. NaN without a pool.

Two references, each the same prompts and seeds judged without the learned identifier:

- the untrained identifier (the initializer word's rows): :func:`with_untrained` adds, for every rate,
  ``<name>_untrained``, and for every leak rate ``<name>_excess`` (trained - untrained): what the
  training added;
- the action word itself in place of ``<A>`` ("a photo of a cat jumping"): :func:`with_word` adds
  ``<name>_word`` and ``<name>_word_excess`` (trained - word): what the identifier carries beyond the
  backbone's own prior for the pose (the word's images may show appearance too), and
  ``clean_both_correct_word``: both correct, and no exemplar look that the word's own image of the same
  subject and seed does not show as well (:func:`clean_against`).

``clean_both_correct`` itself uses no reference (any exemplar look counts against it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

#: Per-image correctness flags and the rate each one becomes.
RATES = {"action_correct": "action_acc", "subject_correct": "subject_acc", "both_correct": "both_correct",
         "clean_both_correct": "clean_both_correct"}


def leak_names(factors: Sequence[str] = ()) -> tuple[str, ...]:
    """The leak metrics for a judge naming ``factors`` (besides action and subject)."""
    return ("leak_subject", *(f"leak_{f}" for f in factors if f != "subject"), "appearance_leak",
            "leak_pool_appearance")


def metric_names(factors: Sequence[str] = ()) -> tuple[str, ...]:
    """Every metric reported for a judge naming ``factors``, in report order."""
    leaks = leak_names(factors)
    return (*RATES.values(), *leaks, *(f"{n}_untrained" for n in (*RATES.values(), *leaks)), *(f"{n}_excess" for n in leaks),
            *(f"{n}_word" for n in leaks), *(f"{n}_word_excess" for n in leaks), "clean_both_correct_word")


#: The metrics of every judge (``val/<name>``, ``test/<name>``); sweeps optimise ``val/clean_both_correct_word``.
METRIC_NAMES = metric_names()


def judge_rows(judged: Sequence[Mapping[str, str]], target_action: str, target_subject: Sequence[str],
               exemplars: Sequence[Mapping[str, str]] = (), factors: Sequence[str] = (),
               pool: Sequence[Mapping[str, str]] = ()) -> list[dict]:
    """Per-image flags: the one copy of the ActionBench rules.

    Args:
        judged: ``[N]`` dicts ``{"action", "subject", <factor>: label}`` (``Judgement.rows()``).
        target_action: The learned action A. target_subject: ``[N]`` prompted subjects.
        exemplars: One dict of known attributes per exemplar image.
        factors: The judge's factors besides action and subject (fixes the leak flags' names).
        pool: One dict of known attributes per context-pool image (empty: no pool).

    Returns ``[N]`` dicts with the flags of :data:`RATES` and of :func:`leak_names` (``None``:
    not known, i.e. no exemplar has a value for that attribute).
    """
    if len(judged) != len(target_subject):
        raise ValueError(f"need one prompted subject per judged image, got {len(target_subject)} for {len(judged)}")
    factors = [f for f in factors if f != "subject"]
    values = {k: {e[k] for e in exemplars if k in e} for k in ("subject", *factors)}
    appearance = [f for f in factors if values[f]]
    tuples = {tuple(e[f] for f in appearance) for e in exemplars if all(f in e for f in appearance)}
    pool_tuples = {tuple(e[f] for f in appearance) for e in pool if all(f in e for f in appearance)} - tuples
    out = []
    for row, subject in zip(judged, target_subject):
        flags: dict[str, bool | None] = {"action_correct": row["action"] == target_action,
                                         "subject_correct": row["subject"] == subject}
        flags["both_correct"] = flags["action_correct"] and flags["subject_correct"]
        for k in ("subject", *factors):
            leak = row.get(k) in values[k] and (k != "subject" or row[k] != subject)
            flags[f"leak_{k}"] = leak if values[k] else None
        look = tuple(row.get(f) for f in appearance)
        flags["appearance_leak"] = look in tuples if appearance else None
        flags["leak_pool_appearance"] = look in pool_tuples if appearance and pool_tuples else None
        flags["clean_both_correct"] = flags["both_correct"] and not flags["appearance_leak"]
        out.append(flags)
    return out


class ActionBenchMetric(Metric):
    """Counts :func:`judge_rows` flags; ``compute()`` gives the rates (module docstring).

    Args:
        factors: The judge's factors besides action and subject (e.g. background, pattern, colour).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, factors: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.factors = tuple(f for f in factors if f != "subject")
        self.flag_names = (*RATES, *leak_names(self.factors))
        for flag in self.flag_names:  # images where the flag is true / where it is known
            self.add_state(f"hits_{flag}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"known_{flag}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, judged: Sequence[Mapping[str, str]] | None = None, target_action: str | None = None,
               target_subject: Sequence[str] = (), exemplars: Sequence[Mapping[str, str]] = (),
               pool: Sequence[Mapping[str, str]] = (), *, flags: Sequence[Mapping[str, bool | None]] | None = None) -> None:
        """``judged``, ``target_subject``: ``[N]`` per image; see :func:`judge_rows`. Or ``flags``: ``[N]``
        rows already computed by :func:`judge_rows` with this metric's factors (:meth:`update_flags`)."""
        if flags is None:
            flags = judge_rows(judged, target_action, target_subject, exemplars, self.factors, pool)
        self._count(flags)

    def update_flags(self, rows: Sequence[Mapping[str, bool | None]]) -> None:
        """Count per-image flags already computed by :func:`judge_rows` with this metric's factors
        (a caller that also writes the flags out computes them once). Goes through :meth:`update`,
        so torchmetrics counts the update (``compute`` after it neither warns nor returns a stale cache)."""
        self.update(flags=rows)

    def _count(self, rows: Sequence[Mapping[str, bool | None]]) -> None:
        for flag in self.flag_names:
            known = [r[flag] for r in rows if r[flag] is not None]
            setattr(self, f"hits_{flag}", getattr(self, f"hits_{flag}") + sum(known))
            setattr(self, f"known_{flag}", getattr(self, f"known_{flag}") + len(known))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{name: rate}`` in [0, 1]; NaN where nothing was known (e.g. no appearance factor)."""
        out = {}
        for flag in self.flag_names:
            known = getattr(self, f"known_{flag}")
            rate = getattr(self, f"hits_{flag}") / known if known > 0 else torch.tensor(float("nan"))
            out[RATES.get(flag, flag)] = rate.float()
        return out


def with_untrained(trained: Mapping[str, float], untrained: Mapping[str, float]) -> dict[str, float]:
    """``trained`` plus ``<name>_untrained`` for every rate (the accuracies too: where the run started),
    and for every leak rate ``<name>_excess`` (trained - untrained: the leak the training added over
    what the untrained identifier already shows)."""
    out = dict(trained)
    leaks = [k for k in trained if k.startswith("leak_") or k == "appearance_leak"]
    out.update({f"{k}_untrained": untrained.get(k, math.nan) for k in trained})
    out.update({f"{k}_excess": trained[k] - untrained.get(k, math.nan) for k in leaks})
    return out


def clean_against(flags: Sequence[Mapping[str, bool | None]],
                  reference: Sequence[Mapping[str, bool | None]]) -> list[bool]:
    """Per image, clean both-correct against a reference image of the same prompt subject and seed
    (the action word's, :func:`with_word`): action and subject correct, and either no
    ``appearance_leak`` or one that the reference image shows as well (a look the backbone draws
    for the word is not the identifier's leak). ``flags``, ``reference``: ``[N]`` rows of
    :func:`judge_rows`, in the same order."""
    if len(flags) != len(reference):
        raise ValueError(f"need one reference image per judged image, got {len(reference)} for {len(flags)}")
    return [bool(f["both_correct"]) and not (f["appearance_leak"] and not r["appearance_leak"])
            for f, r in zip(flags, reference)]


def with_word(values: Mapping[str, float], word: Mapping[str, float], clean_word: Sequence[bool]) -> dict[str, float]:
    """``values`` plus, for every leak rate, ``<name>_word`` (the rate of the action word's own images,
    same prompts with the word in place of ``<A>``, same seeds) and ``<name>_word_excess`` (trained -
    word), and ``clean_both_correct_word`` (the mean of :func:`clean_against`; NaN without images)."""
    out = dict(values)
    leaks = [k for k in values if (k.startswith("leak_") or k == "appearance_leak")
             and not k.endswith(("_untrained", "_excess"))]
    out.update({f"{k}_word": word.get(k, math.nan) for k in leaks})
    out.update({f"{k}_word_excess": values[k] - word.get(k, math.nan) for k in leaks})
    out["clean_both_correct_word"] = sum(clean_word) / len(clean_word) if clean_word else math.nan
    return out
