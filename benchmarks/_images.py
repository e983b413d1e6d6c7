"""Intervals over judged images, and the benchmark's figures.

A percentile bootstrap over 3 seeds is degenerate (3 values), so the intervals here resample the
judged images (unseen subject x test seed) of each run, stratified by run: every resample keeps
each run's image count, and a column's value is the mean over its runs, as the tables report.
Paired differences resample the matched images (same prompt and test seed) of each paired run.

Metric names follow ``adi_lightning.evaluation.metrics``; a run's per-image flags are the columns
of its ``<run>.csv`` (written by the test stage). A leak's excess over a reference (``_excess``:
the untrained identifier; ``_word_excess``: the action word) subtracts that run's reference rate,
which does not depend on the identifier, from the resampled trained rate: the reference is held
fixed, and the interval is the trained rate's.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

# metric -> the per-image flag column of the run's CSV that it is the mean of
FLAG_OF = {"action_acc": "action_correct", "subject_acc": "subject_correct"}
REFERENCE_SUFFIXES = ("_word_excess", "_excess")


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def flag_column(metric: str) -> tuple[str, str | None]:
    """``(CSV flag column, reference suffix or None)`` of an image-level metric."""
    for suffix in REFERENCE_SUFFIXES:
        if metric.endswith(suffix):
            return FLAG_OF.get(metric[: -len(suffix)], metric[: -len(suffix)]), suffix
    return FLAG_OF.get(metric, metric), None


def flags(rows: list[dict[str, str]], column: str) -> list[float]:
    """The column as 0/1 values; an image without a value (unknown factor) is dropped."""
    return [1.0 if r[column] == "True" else 0.0 for r in rows if r.get(column) in ("True", "False")]


def _percentile(values: list[float], level: float) -> tuple[float, float]:
    values, tail = sorted(values), (1 - level) / 2
    return values[int(tail * len(values))], values[math.ceil((1 - tail) * len(values)) - 1]


def run_interval(runs: list[tuple[list[dict[str, str]], dict[str, float]]], metric: str, resamples: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of ``metric`` over runs given as ``(CSV rows, run metrics)``; NaNs when the
    runs have no image flag for it."""
    column, suffix = flag_column(metric)
    reference_key = None if suffix is None else metric[: -len(suffix)] + ("_word" if suffix == "_word_excess" else "_untrained")
    per_run = []
    for rows, metrics in runs:
        values = flags(rows, column)
        reference = 0.0 if reference_key is None else metrics.get(reference_key, math.nan)
        if values and not math.isnan(reference):
            per_run.append((values, reference))
    if not per_run:
        return math.nan, math.nan, math.nan

    def value(samples: list[list[float]]) -> float:
        return sum(sum(v) / len(v) - ref for v, (_, ref) in zip(samples, per_run)) / len(per_run)

    rng = random.Random(seed)
    boot = [value([rng.choices(v, k=len(v)) for v, _ in per_run]) for _ in range(resamples)]
    return (value([v for v, _ in per_run]), *_percentile(boot, level))


def paired_interval(pairs: list[tuple[list[dict[str, str]], list[dict[str, str]]]], metric: str,
                    resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float, int]:
    """``(mean a - b, lo, hi, images)`` over paired runs' matched images (same prompt and test seed).
    Reference excesses cancel in a difference, so ``metric``'s plain flag is used."""
    column, _ = flag_column(metric)
    matched = []
    for rows_a, rows_b in pairs:
        b_of = {(r["prompt_index"], r["seed_index"]): r for r in rows_b}
        diffs = [float(a[column] == "True") - float(b_of[k][column] == "True") for a in rows_a
                 if (k := (a["prompt_index"], a["seed_index"])) in b_of
                 and a.get(column) in ("True", "False") and b_of[k].get(column) in ("True", "False")]
        if diffs:
            matched.append(diffs)
    if not matched:
        return math.nan, math.nan, math.nan, 0

    def value(samples: list[list[float]]) -> float:
        return sum(sum(d) / len(d) for d in samples) / len(samples)

    rng = random.Random(seed)
    boot = [value([rng.choices(d, k=len(d)) for d in matched]) for _ in range(resamples)]
    return (value(matched), *_percentile(boot, level), sum(map(len, matched)))


# ------------------------------------------------------------------ figures (matplotlib, PNG)
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out ``fig`` and write it as a PNG atomically."""
    from adi_lightning.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # a legend beside the axes stays in
    plt.close(fig)
    return Path(path)


def curve_figure(curves: dict[str, dict[float, dict[str, tuple[float, float, float]]]], metrics: list[str],
                 path: Path, title: str) -> Path:
    """One panel per metric: value against β with 95% interval bars, a line per curve (``{label: {β:
    {metric: (mean, lo, hi)}}}``). Written atomically."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, points in curves.items():
            betas = sorted(points)
            mean = [points[b][metric][0] for b in betas]
            err = [[points[b][metric][0] - points[b][metric][1] for b in betas],
                   [points[b][metric][2] - points[b][metric][0] for b in betas]]
            ax.errorbar(betas, mean, yerr=err, marker="o", capsize=3, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("β (model.mask_threshold)")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def bars_figure(columns: dict[str, dict[str, tuple[float, float, float]]], metrics: list[str], path: Path,
                title: str) -> Path:
    """Grouped bars: per metric, one bar per column (method) with its 95% interval. Written atomically."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(metrics) * max(1, len(columns)) / 2.5, 3.4))
    width = 0.8 / max(1, len(columns))
    for i, (label, values) in enumerate(columns.items()):
        xs = [m + (i - (len(columns) - 1) / 2) * width for m in range(len(metrics))]
        means = [values[k][0] for k in metrics]
        err = [[values[k][0] - values[k][1] for k in metrics], [values[k][2] - values[k][0] for k in metrics]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right", fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the axes: clear of the labels
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)
