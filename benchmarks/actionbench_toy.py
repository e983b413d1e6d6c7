"""ActionBench-toy: does ADI's <A> carry the action to unseen subjects better than TI and P+?

Trains every method on several toy actions and seeds through the real experiment configs
(``experiments/toy_<action>.yaml`` plus a ``configs/model/<method>.yaml`` preset, via the CLI
parser), tests each identifier with the exact toy judges, and prints one table (method x metric,
mean and spread over actions and seeds), then the threshold curve (beta 0.1 ... 1.0) for ADI on
one action and one seed. The last line is the table as one JSON object keyed by method.

    python benchmarks/actionbench_toy.py            # default size: under an hour on 2 CPU cores
    python benchmarks/actionbench_toy.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from adi_lightning.toy.world import ACTIONS  # one experiments/toy_<action>.yaml each

REPO = Path(__file__).resolve().parents[1]
# "init": the untrained identifier (every row = the initializer word, "person"), tested without
# fit: what the backbone already does with "a photo of a cat person". A method must beat it.
METHODS = ("init", "ti", "pplus", "adi", "adi_no_layerwise", "adi_context_only", "adi_action_only")
METRICS = ("action_acc", "subject_acc", "both_correct", "leak", "context_leak")


def run_one(action: str, method: str, seed: int, steps: int, test_seeds: int, root: Path, extra: list[str],
            grid_to: Path | None = None) -> dict:
    """fit (except for ``init``) then test one identifier; returns the test metrics (and copies the test
    grid to ``grid_to``)."""
    from adi_lightning.cli import RUN_DIR_ENV, ADICLI

    os.environ.pop(RUN_DIR_ENV, None)
    args = [
        "--config", str(REPO / "experiments" / f"toy_{action}.yaml"),
        "--model", str(REPO / "configs" / "model" / f"{'ti' if method == 'init' else method}.yaml"),
        f"--seed_everything={seed}", f"--data.seed={seed}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={root}", f"--data.test_seeds={list(range(test_seeds))}",
        "--trainer.limit_val_batches=0", *extra,
    ]
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the benchmark's own flags are not the CLI's
        cli = ADICLI(args=args, run=False)
    if method != "init":
        cli.trainer.fit(cli.model, cli.datamodule)
    (metrics,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    if grid_to is not None:
        from adi_lightning.io import atomic_path

        (grid,) = (Path(cli.model.run_dir) / "images").glob("test_step*.png")
        with atomic_path(grid_to) as tmp:
            shutil.copyfile(grid, tmp)
    return {k: metrics.get(f"test/{k}", float("nan")) for k in METRICS}


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    table = {}
    for method, runs in results.items():
        row = {}
        for metric in METRICS:
            values = [r[metric] for r in runs if r[metric] == r[metric]]
            if values:
                row[metric] = round(statistics.fmean(values), 4)
                row[f"{metric}_std"] = round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0
        row["runs"] = len(runs)
        table[method] = row
    return table


def print_table(table: dict[str, dict[str, float]]) -> None:
    header = f"{'method':<18}" + "".join(f"{m:>22}" for m in METRICS)
    print(header)
    print("-" * len(header))
    for method, row in table.items():
        cells = "".join(f"{row.get(m, float('nan')):>14.3f} ± {row.get(m + '_std', 0):<5.3f}" for m in METRICS)
        print(f"{method:<18}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actions", nargs="+", default=["jumping", "raising", "kicking"], choices=ACTIONS,
                        help="toy actions, each trained with experiments/toy_<action>.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per identifier")
    parser.add_argument("--test-seeds", type=int, default=4, help="images per unseen subject at test")
    parser.add_argument("--beta", type=float, default=None,
                        help="mask threshold for the masked methods (adi*); default: each preset's (0.5)")
    parser.add_argument("--curve", nargs="*", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                        help="betas of the threshold curve (ADI, first action, first seed); empty to skip")
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 action, 1 seed, few steps, 3 methods")
    parser.add_argument("--out", default=None, help="also write the results JSON here")
    parser.add_argument("--grids", default=None,
                        help="folder for one labelled test grid per method (first action, first seed, same prompts)")
    args = parser.parse_args()
    if args.quick:
        args.actions, args.seeds, args.steps, args.test_seeds = args.actions[:1], args.seeds[:1], 10, 1
        args.methods, args.curve = ["init", "ti", "pplus", "adi"], [0.5, 1.0]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    started = time.time()
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="actionbench-") as tmp:
        for action in args.actions:
            for seed in args.seeds:
                for method in args.methods:
                    t0 = time.time()
                    first = action == args.actions[0] and seed == args.seeds[0]
                    grid_to = Path(args.grids) / f"{method}.png" if args.grids and first else None
                    extra = [f"--model.mask_threshold={args.beta}"] if args.beta is not None and method.startswith("adi") else []
                    metrics = run_one(action, method, seed, args.steps, args.test_seeds, Path(tmp), extra, grid_to)
                    results[method].append(metrics)
                    runs.append({"action": action, "seed": seed, "method": method, **metrics})
                    print(f"[{time.time() - started:7.0f}s] {action:<9} seed {seed} {method:<17} "
                          + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()) + f"  ({time.time() - t0:.0f}s)", flush=True)
        curve = {}
        for beta in args.curve:
            metrics = run_one(args.actions[0], "adi", args.seeds[0], args.steps, args.test_seeds, Path(tmp),
                              [f"--model.mask_threshold={beta}"])
            curve[beta] = metrics
            print(f"[{time.time() - started:7.0f}s] curve beta={beta:.1f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    table = summarize(results)
    print(f"\nActionBench-toy: {len(args.actions)} actions x {len(args.seeds)} seeds, {args.steps} steps, "
          f"{args.test_seeds} test seeds per subject; wall {time.time() - started:.0f} s\n")
    print_table(table)
    for baseline in ("init", "ti", "pplus"):
        if "adi" in results and baseline in results:
            diffs = [a["both_correct"] - b["both_correct"] for a, b in zip(results["adi"], results[baseline])]
            print(f"ADI - {baseline} both_correct, paired by (action, seed): mean {statistics.fmean(diffs):+.3f}, "
                  f"min {min(diffs):+.3f}, max {max(diffs):+.3f} over {len(diffs)} pairs")
    if curve:
        print(f"\nthreshold curve (ADI, {args.actions[0]}, seed {args.seeds[0]}):")
        print(f"{'beta':>6}" + "".join(f"{m:>14}" for m in METRICS))
        for beta, metrics in curve.items():
            print(f"{beta:>6.1f}" + "".join(f"{metrics[m]:>14.3f}" for m in METRICS))
    if args.out:
        from adi_lightning.io import atomic_write_json

        atomic_write_json(args.out, {"table": table, "runs": runs, "curve": {str(b): m for b, m in curve.items()},
                                     "args": vars(args), "wall_s": round(time.time() - started)})
    print(json.dumps(table, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
