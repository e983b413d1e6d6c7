"""ActionBench-toy v2: does ADI's <A> carry the action to unseen subjects better than TI and P+?

Each run (method, action, seed, toy folder) fits through ``experiments/toy_<action>.yaml`` plus
``configs/model/<method>.yaml`` in its own subprocess, then tests; its numbers are the ones the test
stage wrote (``metrics/test_step*.json``), kept atomically in ``<out>/runs/`` and reused on a rerun.
Tables: per folder, every metric per method; paired differences; the ablations; the β curves
of the shipped ADI and the channel-mask preset. Image-level metrics get 95% intervals that resample the judged images of each run
(``benchmarks/_images.py``: 3 seeds alone would make a degenerate bootstrap); the others mean ± std
over runs. Figures (PNG): per-folder bars with intervals and the β curve (benchmarks/README.md).

    OMP_NUM_THREADS=1 python benchmarks/actionbench_toy.py          # default size (150 runs of 500 steps), many hours
    OMP_NUM_THREADS=1 python benchmarks/actionbench_toy.py --quick  # smoke run, about 2 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from unittest import mock

import _images  # noqa: E402  (benchmarks/, beside this script)

from adi_lightning.paths import TOY_DIFFICULTIES, is_in_cache
from adi_lightning.toy.world import ACTIONS  # one experiments/toy_<action>.yaml each

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "model"
# init: the untrained identifier (every row = the initializer word), tested without fit; the bar
# a method must clear. It is built with the TI preset (no partners to load); nothing is trained.
PRESET_OF = {"init": "ti"}
MAIN_METHODS = ("init", "ti", "pplus", "adi", "adi_channel")
ABLATIONS = ("adi_no_layerwise", "adi_context_only", "adi_action_only", "adi_no_subject_words")
# Presets measured on request (--methods names them), not in the default plan: the paper read literally.
OPTIONAL_METHODS = ("adi_paper",)
FOLDERS = TOY_DIFFICULTIES
COMPARISONS = (("adi", "pplus"), ("adi", "ti"), ("adi_paper", "pplus"), ("adi_channel", "pplus"))
# β curves: the shipped default and the channel-mask preset (under both, β blends the raw gradient into the
# statistic's update, 0 = the update alone); 1.0 is P+ for both.
CURVE_BETAS = {"adi": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "adi_channel": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)}
# Planning estimate per run, two runs at once on the 2-core CPU (toy UNet, the default backbone; another
# backbone's plan says so): process start, seconds per training step (ADI's triples vs anchor-only; ADI's
# re-measured 2026-12-07 from the median wall time of 69 multi-start runs, the rest 2026-11-30), and per
# test seed (7 subjects, + untrained).
EST_START_S, EST_STEP_S, EST_TEST_SEED_S = 10.0, {"adi": 0.5, "other": 0.23}, 7.5
EST_SCORE_S = 2.5  # one multi-start scoring (96 forward passes), two runs at once
# --backbone: the model config layered under each method preset (it names the pipeline and its sampling
# settings); toy = configs/model/toy.yaml, which every experiments/toy_<action>.yaml already uses.
BACKBONES = ("toy", "toy_sd3")
DEFAULT_BACKBONE = "toy"


def model_settings(method: str, backbone: str = DEFAULT_BACKBONE) -> dict:
    """The model keys a run of ``method`` trains with before the benchmark's own flags: the toy model config
    (every experiments/toy_<action>.yaml's), the backbone config over it, the method preset over both. A
    record keeps them, so a changed default or preset reruns its runs instead of reusing stale ones."""
    import yaml

    layers = ["toy", *([] if backbone == DEFAULT_BACKBONE else [backbone]), PRESET_OF.get(method, method)]
    settings = {}
    for name in layers:
        settings.update(yaml.safe_load((PRESETS / f"{name}.yaml").read_text()) or {})
    return settings


# ------------------------------------------------------------------ pure helpers (tested)
def spec(method, action, folder, seed, steps, test_seeds, beta=None, starts=1, backbone=DEFAULT_BACKBONE,
         model=None) -> dict:
    """One run's identity; ``model``: its :func:`model_settings` (records made before they were kept have none,
    and are not reused by a plan that has them)."""
    s = {"method": method, "action": action, "folder": folder, "seed": seed, "steps": steps,
         "test_seeds": test_seeds, "beta": beta, "starts": starts}
    s = s if backbone == DEFAULT_BACKBONE else {**s, "backbone": backbone}  # older records name no backbone
    return s if model is None else {**s, "model": model}


def run_key(s: dict) -> str:
    beta = "" if s["beta"] is None else f"-beta{s['beta']:g}".replace(".", "p")  # no dot: keys get suffixes
    starts = "" if s.get("starts", 1) == 1 else f"-{s['starts']}starts"
    backbone = "" if s.get("backbone", DEFAULT_BACKBONE) == DEFAULT_BACKBONE else f"{s['backbone']}-"
    return (f"{backbone}{s['method']}-{s['action']}-{s['folder']}-seed{s['seed']}-{s['steps']}steps{starts}-"
            f"{s['test_seeds']}ts{beta}")


def curve_betas(args, method: str) -> list[float]:
    """The β values of ``method``'s curve: ``--curve-betas`` when given, else :data:`CURVE_BETAS`."""
    return list(CURVE_BETAS[method]) if args.curve_betas is None else list(args.curve_betas)


def make_plan(args, preset_betas: dict[str, float]) -> dict[str, list]:
    """The runs of each part: main, ablations (with ADI beside them), curve ((method, action, beta, spec)
    tuples; a β equal to the method's preset is the preset's own run, and β = 1.0 is P+'s run)."""
    starts, backbone = getattr(args, "starts", 1), getattr(args, "backbone", DEFAULT_BACKBONE)
    settings = {}

    def model(m):  # each preset read once (setdefault would read it on every call)
        if m not in settings:
            settings[m] = model_settings(m, backbone)
        return settings[m]

    main = [spec(m, a, f, s, args.steps, args.test_seeds, starts=starts, backbone=backbone, model=model(m))
            for f in args.folders for a in args.actions for s in args.seeds for m in args.methods]
    ablations = [spec(m, args.ablation_action, args.ablation_folder, s, args.steps, args.test_seeds, starts=starts,
                      backbone=backbone, model=model(m))
                 for s in args.seeds for m in ("adi", *args.ablations)] if args.ablations else []
    def point(m, a, b, s):  # β = 1.0 is P+ bit for bit under every statistic (tests/test_threshold.py): P+'s run
        if b == 1.0:
            return spec("pplus", a, args.curve_folder, s, args.steps, args.test_seeds, None, starts, backbone,
                        model("pplus"))
        return spec(m, a, args.curve_folder, s, args.steps, args.test_seeds, None if b == preset_betas.get(m) else b,
                    starts, backbone, model(m))

    curve = [(m, a, b, point(m, a, b, s)) for m in args.curve_methods for a in args.curve_actions
             for b in curve_betas(args, m) for s in args.curve_seeds]
    return {"main": main, "ablations": ablations, "curve": curve}


def unique_runs(plan: dict) -> dict[str, dict]:
    runs = [*plan["main"], *plan["ablations"], *(c[-1] for c in plan["curve"])]
    return {run_key(s): s for s in runs}  # a run planned twice (e.g. ADI at the preset's beta) runs once


def estimate_s(s: dict) -> float:
    train = 0 if s["method"] == "init" else (s["steps"] * EST_STEP_S["adi" if s["method"].startswith("adi") else "other"]
                                             + EST_SCORE_S * s.get("starts", 1))
    return EST_START_S + train + EST_TEST_SEED_S * s["test_seeds"]


def estimate_text(planned_s: float, backbone: str) -> str:
    """The plan line's estimate: from the toy UNet's per-step timings (:data:`EST_STEP_S`), said so for
    another backbone."""
    return f"estimate {planned_s / 60:.0f} min" + ("" if backbone == DEFAULT_BACKBONE else
                                                   " (UNet timings; the ETA corrects it)")


def header_text(args, done: int, planned: int, minutes: float) -> str:
    """The tables' first line; the backbone is named only when not the default, so the default's tables
    keep their header."""
    on = "" if args.backbone == DEFAULT_BACKBONE else f" on the {args.backbone} backbone"
    return (f"ActionBench-toy v2{on}: actions {args.actions}, seeds {args.seeds}, folders {args.folders}, "
            f"{args.steps} steps, {args.test_seeds} test seeds per unseen subject; {done}/{planned} runs; "
            f"this invocation {minutes:.1f} min with {args.jobs} jobs")


def metric_order(records: list[dict]) -> list[str]:
    """The runs' metric names in the evaluation's report order (rates, leaks, untrained, excess)."""
    from adi_lightning.evaluation.metrics import metric_names

    names = list(dict.fromkeys(k for r in records for k in r["metrics"]))
    factors = [n[5:] for n in names if n.startswith("leak_") and not n.endswith(("_untrained", "_excess"))]
    order = metric_names(factors)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def is_leak(name: str) -> bool:
    return (name.startswith("leak_") or name.startswith("appearance_leak")) and not name.endswith("_untrained")


def summarize(records: list[dict], metrics: list[str]) -> dict[str, dict]:
    """Per metric: mean, sample std (0 for one value) and n over the records' non-NaN values."""
    out = {}
    for m in metrics:
        v = [r["metrics"][m] for r in records if not math.isnan(r["metrics"].get(m, math.nan))]
        out[m] = {"mean": statistics.fmean(v) if v else math.nan,
                  "std": statistics.stdev(v) if len(v) > 1 else (0.0 if v else math.nan), "n": len(v)}
    return out


def bootstrap_ci(values: list[float], resamples: int = 2000, level: float = 0.95, seed: int = 0):
    """(mean, lo, hi): the mean and its percentile-bootstrap interval (fixed RNG seed)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return statistics.fmean(values), means[int(tail * resamples)], means[math.ceil((1 - tail) * resamples) - 1]


def paired(records: list[dict], a: str, b: str, metrics: list[str], folders: list[str]) -> dict:
    """``a - b`` per (action, seed, folder) pair; per folder and over all: mean, lo, hi, n."""
    by = {(r["spec"]["method"], r["spec"]["action"], r["spec"]["seed"], r["spec"]["folder"]): r["metrics"]
          for r in records if r["spec"]["beta"] is None}
    out = {}
    for where in (*folders, "all"):
        pairs = [(x, by[(b, *k[1:])]) for k, x in by.items()
                 if k[0] == a and (b, *k[1:]) in by and where in ("all", k[3])]
        out[where] = {}
        for m in metrics:
            diffs = [x.get(m, math.nan) - y.get(m, math.nan) for x, y in pairs]
            mean, lo, hi = bootstrap_ci(diffs)
            out[where][m] = {"mean": mean, "lo": lo, "hi": hi, "n": sum(not math.isnan(d) for d in diffs)}
    return out


def paired_images(records: list[dict], a: str, b: str, metrics: list[str], folders: list[str],
                  rows_of: dict[str, list]) -> dict:
    """``a - b`` over the matched images of runs paired by (action, seed, folder), per folder and over
    all: mean, lo, hi (95%, images resampled within each pair, :func:`_images.paired_interval`), and n
    (pairs). Without per-image rows, :func:`paired` (a bootstrap over pairs)."""
    if not rows_of:
        return paired(records, a, b, metrics, folders)
    by = {(r["spec"]["method"], r["spec"]["action"], r["spec"]["seed"], r["spec"]["folder"]): rows_of.get(run_key(r["spec"]))
          for r in records if r["spec"]["beta"] is None}
    out = {}
    for where in (*folders, "all"):
        pairs = [(x, by[(b, *k[1:])]) for k, x in by.items()
                 if k[0] == a and (b, *k[1:]) in by and where in ("all", k[3]) and x and by[(b, *k[1:])]]
        out[where] = {}
        for m in metrics:
            mean, lo, hi, _ = _images.paired_interval(pairs, m)
            out[where][m] = {"mean": mean, "lo": lo, "hi": hi, "n": len(pairs)}
    return out


def format_table(title: str, columns: dict[str, dict[str, dict]], metrics: list[str], cell) -> str:
    rendered = {c: [cell(col[m]) if m in col else "-" for m in metrics] for c, col in columns.items()}
    width = max([len(title), *map(len, metrics)]) + 2
    widths = {c: max([len(c), *map(len, cells)]) + 2 for c, cells in rendered.items()}
    lines = [f"{title:<{width}}" + "".join(f"{c:>{widths[c]}}" for c in columns)]
    lines.append("-" * len(lines[0]))
    lines += [f"{m:<{width}}" + "".join(f"{rendered[c][i]:>{widths[c]}}" for c in columns)
              for i, m in enumerate(metrics)]
    return "\n".join(lines)


def mean_std(x: dict) -> str:
    return f"{x['mean']:.3f}±{x['std']:.3f}"


def cell(x: dict) -> str:
    """``mean [lo,hi]`` where an image-level interval exists, else ``mean±std`` over runs."""
    return f"{x['mean']:.3f} [{x['lo']:.2f},{x['hi']:.2f}]" if "lo" in x else mean_std(x)


def diff_ci(x: dict) -> str:
    return f"{x['mean']:+.3f} [{x['lo']:+.3f},{x['hi']:+.3f}]"


def json_safe(obj):  # NaN -> null (strict JSON)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


# ------------------------------------------------------------------ one run (in the subprocess)
def cli_args(action: str, method: str, seed: int, steps: int, test_seeds: int, root: Path, extra: list[str],
             backbone: str = DEFAULT_BACKBONE) -> list[str]:
    """The LightningCLI arguments of one run: the action's experiment, the backbone config (when not the
    experiment's own), the method preset, then the benchmark's overrides; later ones win."""
    args = [
        "--config", str(REPO / "experiments" / f"toy_{action}.yaml"),
        *([] if backbone == DEFAULT_BACKBONE else ["--model", str(PRESETS / f"{backbone}.yaml")]),
        "--model", str(PRESETS / f"{PRESET_OF.get(method, method)}.yaml"),
        f"--seed_everything={seed}", f"--data.seed={seed}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={root}", f"--data.test_seeds={list(range(test_seeds))}", *extra,
    ]
    if method == "init":  # test refuses the untrained identifier unless asked for it by name
        args.append("--model.identifier_path=untrained")
    return args


def run_one(action: str, method: str, seed: int, steps: int, test_seeds: int, root: Path, extra: list[str],
            keep: Path | None = None, backbone: str = DEFAULT_BACKBONE) -> dict[str, float]:
    """fit (except ``init``) then test one identifier in this process; returns the test metrics the
    test stage wrote (NaN where it wrote none), and copies its CSV and grid to ``keep``.csv / .png."""
    from adi_lightning.cli import RUN_DIR_ENV, ADICLI

    os.environ.pop(RUN_DIR_ENV, None)
    args = cli_args(action, method, seed, steps, test_seeds, root, extra, backbone)
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the benchmark's own flags are not the CLI's
        cli = ADICLI(args=args, run=False)
    if method != "init":
        cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    run_dir = Path(cli.model.run_dir)
    (written,) = (run_dir / "metrics").glob("test_step*.json")
    if keep is not None:
        from adi_lightning.io import atomic_path

        for source in (written.with_suffix(".csv"), *(run_dir / "images").glob("test_step*.png")):
            with atomic_path(keep.parent / (keep.name + source.suffix)) as tmp:  # per-image judgements, the test grid
                shutil.copyfile(source, tmp)
    metrics = json.loads(written.read_text())["metrics"]
    return {k: math.nan if v is None else float(v) for k, v in metrics.items()}


def worker(payload: str) -> int:
    import torch

    from adi_lightning.io import atomic_write_json, git_revision

    job = json.loads(payload)
    s, result = job["spec"], Path(job["result"])
    torch.set_num_threads(1)
    extra = [f"--data.root={job['data_root']}"]
    if is_in_cache(job["data_root"]):  # only there is the folder (re-)exported, with this difficulty; elsewhere inert
        extra.append(f"--data.toy_difficulty={s['folder']}")
    extra += [] if s["beta"] is None else [f"--model.mask_threshold={s['beta']}"]
    extra += [f"--model.starts={s.get('starts', 1)}"]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="actionbench-") as tmp:
        metrics = run_one(s["action"], s["method"], s["seed"], s["steps"], s["test_seeds"], Path(tmp), extra,
                          keep=result.with_suffix(""), backbone=s.get("backbone", DEFAULT_BACKBONE))
    atomic_write_json(result, json_safe({"spec": s, "metrics": metrics, "wall_s": round(time.time() - started, 1),
                                         "git": git_revision(REPO), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return 0


# ------------------------------------------------------------------ orchestration
def load_result(path: Path, s: dict) -> dict | None:
    """A finished run's record when its spec, model settings included, is this one (a resumed benchmark
    reuses it)."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    if {"starts": 1, **record.get("spec", {})} != s:  # records from before multi-start ran one start
        return None
    record["metrics"] = {k: math.nan if v is None else v for k, v in record["metrics"].items()}
    return record


def launch(s: dict, out: Path, data_dir: Path) -> tuple[int, float]:
    key, started = run_key(s), time.time()
    payload = json.dumps({"spec": s, "result": str(out / "runs" / f"{key}.json"),
                          "data_root": str(data_dir / s["folder"] / s["action"])})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{key}.log", "w") as log:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
        rc = subprocess.run(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - started


def by_column(pairs: list[tuple[str, dict]], records: dict[str, dict], metrics: list[str],
              rows_of: dict[str, list] | None = None) -> dict[str, dict]:
    """{column: summary over its finished runs} for [(column, spec)], columns in first-seen order. With
    ``rows_of`` (run key -> its per-image CSV rows), image-level metrics also get ``lo`` / ``hi``: the 95%
    interval that resamples each run's judged images (:func:`_images.run_interval`)."""
    cols: dict[str, list[str]] = {}
    for col, s in pairs:
        cols.setdefault(col, []).extend([run_key(s)] if run_key(s) in records else [])
    out = {}
    for c, keys in cols.items():
        out[c] = summarize([records[k] for k in keys], metrics)
        runs = [(rows_of[k], records[k]["metrics"]) for k in keys if rows_of and rows_of.get(k)]
        for m in metrics if runs and len(runs) == len(keys) else []:
            if _images.flag_column(m)[0] in runs[0][0][0]:
                out[c][m].update(zip(("mean", "lo", "hi"), _images.run_interval(runs, m)))
    return out


def report(plan: dict, records: dict[str, dict], args, rows_of: dict[str, list] | None = None,
           figures: Path | None = None) -> tuple[str, dict]:
    """The tables (text) and their data; with ``figures``, also the PNG figures written there."""
    metrics = metric_order(list(records.values()))
    diff_metrics = [*(m for m in ("clean_both_correct", "clean_both_correct_word", "action_acc") if m in metrics),
                    *(m for m in filter(is_leak, metrics) if not m.endswith(("_word", "_excess")))]
    main = [records[run_key(s)] for s in plan["main"] if run_key(s) in records]
    data = {"main": {f: by_column([(s["method"], s) for s in plan["main"] if s["folder"] == f], records, metrics, rows_of)
                     for f in args.folders},
            "paired": {f"{a}-{b}": paired_images(main, a, b, diff_metrics, args.folders, rows_of or {})
                       for a, b in COMPARISONS if a in args.methods and b in args.methods},
            "ablations": by_column([(s["method"], s) for s in plan["ablations"]], records, metrics, rows_of),
            "curve": {f"{m}, {a}": by_column([(f"beta={b:g}", s) for m2, a2, b, s in plan["curve"] if (m2, a2) == (m, a)],
                                             records, metrics, rows_of)
                      for m, a in dict.fromkeys((m, a) for m, a, _, _ in plan["curve"])}}
    n = len(args.actions) * len(args.seeds)
    tables = [(f"{f}: over {n} (action, seed); [95% CI over images]", cols, metrics, cell)
              for f, cols in data["main"].items()]
    tables += [(f"{name}: mean [95% CI over matched images], paired by (action, seed, folder)", cols, diff_metrics,
                diff_ci) for name, cols in data["paired"].items()]
    if data["ablations"]:
        tables.append((f"ablations ({args.ablation_action}, {args.ablation_folder}): over seeds", data["ablations"],
                       metrics, cell))
    tables += [(f"curve ({name}, {args.curve_folder}): over seeds {args.curve_seeds}", cols, metrics, cell)
               for name, cols in data["curve"].items()]
    text = [format_table(*t) for t in tables]
    if figures is not None:
        text.append("figures: " + ", ".join(p.name for p in write_figures(data, metrics, args, figures)))
    markdown = [markdown_table(title, cols, [m for m in ms if m in REPORT_METRICS], fn) for title, cols, ms, fn in tables]
    markdown.append(per_run_table([records[k] for k in unique_runs(plan) if k in records]))
    return "\n\n".join(text), data, "\n\n".join(markdown)


#: The rows of the Markdown tables (``table.md``): what the report shows; ``table.txt`` has every metric.
REPORT_METRICS = ("action_acc", "subject_acc", "clean_both_correct", "clean_both_correct_word",
                  "leak_subject_word_excess", "leak_colour_word_excess", "leak_pattern_word_excess",
                  "leak_background_word_excess", "appearance_leak_word_excess", "leak_subject", "appearance_leak",
                  "leak_colour_excess", "leak_pattern_excess", "leak_background_excess",
                  "leak_colour", "leak_pattern", "leak_background")
#: Per-run columns of ``table.md``'s last table.
PER_RUN_METRICS = ("action_acc", "subject_acc", "clean_both_correct_word", "leak_subject_word_excess",
                   "leak_colour_word_excess", "leak_pattern_word_excess", "leak_background_word_excess")


def column_runs(column: dict[str, dict]) -> int:
    """How many runs (paired tables: pairs) a column of :func:`by_column` has: the most of any metric."""
    return max([v.get("n", 0) for v in column.values()], default=0)


def markdown_table(title: str, columns: dict[str, dict[str, dict]], metrics: list[str], cell) -> str:
    """``format_table``'s table as Markdown: a bold title line, one column per method (or β), the number of runs
    (paired tables: pairs) each column has so far, then a row per metric."""
    lines = [f"**{title}**", "", "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|",
             "| runs (pairs) | " + " | ".join(str(column_runs(col)) for col in columns.values()) + " |"]
    lines += ["| " + " | ".join([m, *(cell(col[m]) if m in col and not math.isnan(col[m]["mean"]) else "-"
                                      for col in columns.values())]) + " |" for m in metrics]
    return "\n".join(lines)


def short_revision(revision) -> str:
    """A commit as 7 hex digits, keeping ``-dirty`` (a run or table made with uncommitted changes says so)."""
    revision = str(revision)
    return revision[:7] + ("-dirty" if revision.endswith("-dirty") else "")


def per_run_table(records: list[dict]) -> str:
    """One Markdown row per finished run: its spec, :data:`PER_RUN_METRICS` and the commit that ran it."""
    lines = ["**every run**", "", "| method | action | folder | seed | β | " + " | ".join(PER_RUN_METRICS) + " | commit |",
             "|---" * (len(PER_RUN_METRICS) + 6) + "|"]
    order = sorted(records, key=lambda r: (r["spec"]["folder"], r["spec"]["action"], r["spec"]["method"],
                                           r["spec"]["beta"] if r["spec"]["beta"] is not None else -1, r["spec"]["seed"]))
    for r in order:
        s, m = r["spec"], r["metrics"]
        values = ["-" if math.isnan(m.get(k, math.nan)) else f"{m[k]:.2f}" for k in PER_RUN_METRICS]
        beta = "preset" if s["beta"] is None else f"{s['beta']:g}"
        lines.append("| " + " | ".join([s["method"], s["action"], s["folder"], str(s["seed"]), beta, *values,
                                         short_revision(r.get("git", "?"))]) + " |")
    return "\n".join(lines)


FIGURE_METRICS = ("action_acc", "subject_acc", "clean_both_correct_word", "leak_subject_word_excess",
                  "leak_colour_word_excess", "leak_pattern_word_excess", "leak_background_word_excess")
#: On ``diverse`` every colour, pattern and background is some exemplar's, so the single-factor leaks read 1.00 for
#: every method; its bars show the whole-look leak instead.
DIVERSE_FIGURE_METRICS = (*FIGURE_METRICS[:4], "appearance_leak_word_excess")


def write_figures(data: dict, metrics: list[str], args, folder: Path) -> list[Path]:
    """Per-folder bars (every method, 95% intervals) and the β curve, for the metrics the runs have."""
    shown = [m for m in FIGURE_METRICS if m in metrics]
    written = []

    def with_interval(cols: dict, shown=shown) -> dict:
        return {c: {m: (v[m]["mean"], v[m].get("lo", v[m]["mean"]), v[m].get("hi", v[m]["mean"])) for m in shown}
                for c, v in cols.items() if all(m in v and v[m].get("n", 0) for m in shown)}

    for f, cols in data["main"].items():
        metrics_f = [m for m in (DIVERSE_FIGURE_METRICS if f == "diverse" else FIGURE_METRICS) if m in metrics]
        if len(bars := with_interval(cols, metrics_f)) > 1:  # the legend says how many planned runs each bar has
            planned = len(args.actions) * len(args.seeds)
            written.append(_images.bars_figure(
                {f"{c} ({column_runs(cols[c])}/{planned} runs)": v for c, v in bars.items()}, metrics_f, folder / f"bars_{f}.png",
                f"ActionBench-toy v2, {f}: (action, seed) runs finished of {', '.join(args.actions)} x seeds "
                f"{args.seeds}"))
    for action in args.curve_actions:  # one figure per action, a line per method (β = 1.0 is P+ for both)
        lines = {name.split(", ")[0]: {float(c.split("=", 1)[1]): v for c, v in with_interval(cols).items()}
                 for name, cols in data["curve"].items() if name.endswith(f", {action}")}
        if any(lines.values()):
            written.append(_images.curve_figure(
                {m: points for m, points in lines.items() if points}, shown,
                folder / f"curve_{action}_{args.curve_folder}.png",
                f"β curve: {action}, {args.curve_folder}, seeds {args.curve_seeds} "
                "(β: the raw gradient's weight in the blend)"))
    return written


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actions", nargs="+", default=["jumping", "kicking", "squatting"], choices=ACTIONS)
    p.add_argument("--methods", nargs="+", default=list(MAIN_METHODS), choices=[*MAIN_METHODS, *ABLATIONS, *OPTIONAL_METHODS])
    p.add_argument("--folders", nargs="+", default=["shared", "diverse"], choices=FOLDERS, help="data.toy_difficulty")
    p.add_argument("--seeds", nargs="+", type=int, default=[3, 4, 5], help="seed_everything and data.seed")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per identifier, the starts included (default: configs/trainer/toy.yaml's)")
    p.add_argument("--starts", type=int, default=None, help="model.starts (default: the backbone config's)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=BACKBONES,
                   help="configs/model/<backbone>.yaml under each method preset: toy (the UNet, default) or toy_sd3 "
                        "(the toy MMDiT; build it first: python -m adi_lightning.toy pretrain-sd3)")
    p.add_argument("--test-seeds", type=int, default=4, help="test images per unseen subject")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=ABLATIONS, help="empty: skip")
    p.add_argument("--ablation-action", default="jumping", choices=ACTIONS)
    p.add_argument("--ablation-folder", default="shared", choices=FOLDERS)
    p.add_argument("--curve-methods", nargs="*", default=list(CURVE_BETAS), choices=list(CURVE_BETAS),
                   help="methods whose β curve is measured (empty: skip)")
    p.add_argument("--curve-betas", nargs="*", type=float, default=None,
                   help="β values of every curve (default: each method's, CURVE_BETAS; empty: skip)")
    p.add_argument("--curve-actions", nargs="+", default=["jumping", "kicking"], choices=ACTIONS)
    p.add_argument("--curve-folder", default="shared", choices=FOLDERS)
    p.add_argument("--curve-seeds", nargs="+", type=int, default=[3, 4, 5])
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one subprocess each")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/actionbench_toy_v2)")
    p.add_argument("--data-dir", default=str(REPO / ".cache" / "actionbench_toy"), help="toy folders <folder>/<action>")
    p.add_argument("--quick", action="store_true", help="smoke size: 1 action, seed, folder; 20 steps; init/pplus/adi")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables and figures from the runs already finished in --out; run nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.actions, args.seeds, args.folders = args.actions[:1], args.seeds[:1], args.folders[:1]
        args.steps, args.starts, args.test_seeds, args.methods = 20, 1, 1, ["init", "pplus", "adi"]
        args.ablations, args.curve_methods = [], []
    import yaml

    if args.steps is None:
        args.steps = yaml.safe_load((REPO / "configs" / "trainer" / "toy.yaml").read_text())["max_steps"]
    toy_model = yaml.safe_load((PRESETS / f"{args.backbone}.yaml").read_text())
    if args.starts is None:
        args.starts = toy_model.get("starts", 1)
    from adi_lightning.checks import check_starts_leave_steps

    try:  # the rule every run would refuse at setup, checked once before launching them
        check_starts_leave_steps(args.starts, toy_model.get("start_steps", 100), args.steps)
    except ValueError as error:
        p.error(f"--steps {args.steps} / --starts {args.starts} (configs/model/{args.backbone}.yaml's start_steps): "
                f"{error}")
    if not (REPO / toy_model["pretrained_model_name_or_path"]).is_dir():
        p.error(f"--backbone {args.backbone}: {toy_model['pretrained_model_name_or_path']} is not built "
                f"(configs/model/{args.backbone}.yaml; docs/method.md says how to build it)")
    suffix = "" if args.backbone == DEFAULT_BACKBONE else f"_{args.backbone}"
    default_out = REPO / (f".cache/actionbench_toy/quick{suffix}" if args.quick
                          else f"benchmarks/results/actionbench_toy_v2{suffix}")
    out, data_dir = Path(args.out or default_out).resolve(), Path(args.data_dir).resolve()

    from adi_lightning.masking import check_threshold

    presets = {m: yaml.safe_load((PRESETS / f"{m}.yaml").read_text()) for m in args.curve_methods}
    for m, preset in presets.items():  # a β the preset's statistic refuses would fail every such run at setup
        for b in curve_betas(args, m):
            try:
                check_threshold(b, preset.get("mask_statistic", "projection"), key=f"--curve-betas ({m})")
            except ValueError as error:
                p.error(str(error))
    plan = make_plan(args, {m: preset.get("mask_threshold") for m, preset in presets.items()})
    runs = unique_runs(plan)
    records = {k: r for k, s in runs.items() if (r := load_result(out / "runs" / f"{k}.json", s)) is not None}
    todo = [] if args.report_only else [s for k, s in runs.items() if k not in records]  # in plan order
    planned_s = sum(map(estimate_s, todo)) / max(1, min(args.jobs, len(todo)))
    print(f"ActionBench-toy v2 -> {out}: {len(runs)} runs ({len(plan['main'])} main, {len(plan['ablations'])} "
          f"ablation, {len(plan['curve'])} curve, shared ones once), {len(records)} already done, {len(todo)} to run "
          f"with {args.jobs} jobs; {estimate_text(planned_s, args.backbone)}", flush=True)
    from adi_lightning.toy.export import ensure_action_folder

    for folder, action in sorted({(s["folder"], s["action"]) for s in todo}):  # exported once, before the jobs
        ensure_action_folder(data_dir / folder / action, action, difficulty=folder)
    started, done_est, done_wall, left_est, failed = time.time(), 0.0, 0.0, sum(map(estimate_s, todo)), []
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futures = {pool.submit(launch, s, out, data_dir): s for s in todo}
    try:
        for i, future in enumerate(as_completed(futures), 1):
            (rc, wall), s = future.result(), futures[future]
            key, est = run_key(s), estimate_s(s)
            done_est, done_wall, left_est = done_est + est, done_wall + wall, left_est - est
            record = load_result(out / "runs" / f"{key}.json", s) if rc == 0 else None
            failed += [key] if record is None else []
            records.update({} if record is None else {key: record})
            # ETA: the remaining estimate, scaled by how the finished runs compared with theirs
            eta = left_est * done_wall / done_est / max(1, min(args.jobs, len(todo) - i))
            result = (f"FAILED, see {out / 'logs' / key}.log" if record is None else " ".join(
                f"{m}={record['metrics'].get(m, math.nan):.3f}" for m in ("clean_both_correct", "action_acc")))
            print(f"[{i}/{len(todo)}] {key}: {result} ({wall:.0f} s); elapsed {(time.time() - started) / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", flush=True)
    finally:  # on Ctrl-C (the running runs get it too) start no further run
        pool.shutdown(wait=True, cancel_futures=True)
    from adi_lightning.io import atomic_write_json, atomic_write_text, git_revision

    # the tree's state before this invocation writes its figures and tables (which may live in the checkout)
    written_at = short_revision(git_revision(REPO))
    rows_of = {k: _images.read_rows(out / "runs" / f"{k}.csv") for k in records if (out / "runs" / f"{k}.csv").is_file()}
    text, data, markdown = report(plan, records, args, rows_of, figures=out)
    header = header_text(args, len(records), len(runs), (time.time() - started) / 60)
    commits = sorted({short_revision(r.get("git", "?")) for r in records.values()})
    command = "OMP_NUM_THREADS=1 python benchmarks/actionbench_toy.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    made = (f"- **Runs made at commits**: {', '.join(commits)}\n"
            f"- **Tables written by**: `{command}` (at {written_at})")
    atomic_write_text(out / "table.txt", f"{header}\n{made}\n\n{text}\n")
    atomic_write_text(out / "table.md", f"{header}\n\n{made}\n\n{markdown}\n")
    atomic_write_json(out / "table.json", json_safe({**data, "settings": {k: v for k, v in vars(args).items()
                                                                          if k != "worker"}, "runs": sorted(records)}))
    print("\n" + header + "\n\n" + text + f"\n\ntables: {out / 'table.txt'}, {out / 'table.json'}")
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
