"""Our Textual Inversion vs diffusers' own ``examples/textual_inversion/textual_inversion.py``.

Both run in one invocation on the same local pipeline folder, the same images (the anchors of
``--action`` in the action folder; diffusers gets copies of them in a plain folder), the same
number of steps, batch, resolution and precision, one after the other in fresh processes:

- diffusers: ``accelerate launch --cpu`` (or on the GPU) of a temporary copy of the script you
  pass with ``--script`` (it is not in the diffusers wheel and is not shipped here). The copy
  differs in one line: ``from torchvision import transforms``, used for one
  ``RandomHorizontalFlip``, becomes a PIL flip (torchvision does not import beside the local torch
  build; the flip costs nothing).
- ours: ``python -m adi_lightning fit`` with the TI preset (``layerwise=false``,
  ``mask_threshold=1.0``), no checkpoints, no validation.

Time is measured identically on both sides, from outside the training code: a global
``torch.optim`` step post-hook records when every optimizer step finishes; the step time is
the interval between consecutive optimizer steps after ``--warmup`` steps (it includes data
loading, forward, backward, optimizer step and each script's own per-step work). Neither side
saves or validates inside the timed window.

    pip install accelerate            # benchmark-only dependency (the `bench` extra)
    python benchmarks/vs_diffusers_ti.py --script /path/to/diffusers/examples/textual_inversion/textual_inversion.py

The last line is machine readable: ``ours_over_diffusers_speed=<ratio>`` (above 1 = ours faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _inputs import fill_default_inputs  # noqa: E402  (benchmarks/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]

# Runs a script or module with a global optimizer-step post-hook that timestamps every step.
TIMED_RUNNER = r'''
import atexit, json, os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

stamps = []
register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stamps.append(time.perf_counter()))
out = os.environ["ADI_BENCH_STAMPS"]
start = time.perf_counter()

def dump():
    with open(out, "w") as handle:
        json.dump({"stamps": stamps, "start": start, "threads": torch.get_num_threads()}, handle)

atexit.register(dump)
target = sys.argv[1]
sys.argv = sys.argv[1:]
if target == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv[0] = target
    runpy.run_path(target, run_name="__main__")
'''

FLIP_SHIM = '''
class transforms:  # adi-lightning benchmark: stands in for torchvision's RandomHorizontalFlip only
    class RandomHorizontalFlip:
        def __init__(self, p=0.5):
            self.p = p

        def __call__(self, image):
            import random
            from PIL import ImageOps
            return ImageOps.mirror(image) if random.random() < self.p else image
'''


def patched_script(script: Path, out: Path) -> Path:
    """A copy of diffusers' script whose torchvision import is replaced by a PIL flip."""
    text = script.read_text()
    pattern = r"^from torchvision import transforms\s*$"
    if not re.search(pattern, text, flags=re.M):
        raise SystemExit(f"{script}: no 'from torchvision import transforms' line; is this diffusers' "
                         "examples/textual_inversion/textual_inversion.py?")
    text = re.sub(pattern, FLIP_SHIM.strip("\n"), text, count=1, flags=re.M)
    if re.search(r"^\s*(import torchvision|from torchvision)", text, flags=re.M):
        raise SystemExit(f"{script}: uses torchvision beyond the one flip; cannot substitute it fairly")
    out.write_text(text)
    return out


def _step_times(stamps_file: Path, warmup: int) -> tuple[list[float], int]:
    record = json.loads(stamps_file.read_text())
    stamps = record["stamps"]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return intervals[warmup:], record["threads"]


def _run(cmd: list[str], env: dict, label: str, log: Path) -> float:
    print(f"# {label}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"{label} failed (exit {done.returncode}); log: {log}")
    return wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="diffusers' examples/textual_inversion/textual_inversion.py")
    parser.add_argument("--pipeline", help="local diffusers pipeline folder (default: the tiny test pipeline, built in a temp dir)")
    parser.add_argument("--data", help="action folder (default: the tiny action folder, built in a temp dir)")
    parser.add_argument("--action", default="jumping", help="whose anchor images both sides train on")
    parser.add_argument("--resolution", type=int, help="pixels (default: the pipeline's native size)")
    parser.add_argument("--batch", type=int, default=3, help="images per step, both sides")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps, both sides")
    parser.add_argument("--warmup", type=int, default=3, help="first step intervals not timed")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no",
                        help="diffusers --mixed_precision; ours: 32-true / bf16-mixed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run both this many times in alternating order and pool the timed steps")
    parser.add_argument("--keep", help="keep logs and outputs in this folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    script = Path(args.script).expanduser().resolve()
    if not script.is_file():
        raise SystemExit(f"--script {script}: no such file")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise SystemExit("diffusers' script needs `accelerate` (pip install accelerate; the `bench` extra)") from None

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="adi-vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        fill_default_inputs(args, work)

        from adi_lightning.cli import RUN_DIR_ENV
        from adi_lightning.data.layout import read_action_folder, records_of_action

        anchors = records_of_action(read_action_folder(args.data), args.action)
        images = work / "images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        for record in anchors:
            shutil.copy(record.path, images / Path(record.path).name)
        runner = work / "timed_runner.py"
        runner.write_text(TIMED_RUNNER)
        copy = patched_script(script, work / "textual_inversion_notorchvision.py")

        env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        env.pop(RUN_DIR_ENV, None)
        never = str(10**9)

        # diffusers
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", args.precision, "--dynamo_backend", "no"]
        if args.device == "cpu":
            launch.append("--cpu")
        diffusers_cmd = launch + [
            str(runner), str(copy), "--pretrained_model_name_or_path", args.pipeline,
            "--train_data_dir", str(images), "--learnable_property", "object", "--placeholder_token", "<A>",
            "--initializer_token", "person", "--resolution", str(args.resolution), "--train_batch_size",
            str(args.batch), "--max_train_steps", str(args.steps), "--learning_rate", "5e-3",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--dataloader_num_workers", "0",
            "--mixed_precision", args.precision, "--save_steps", never, "--checkpointing_steps", never,
            "--validation_steps", never, "--output_dir", str(work / "diffusers_out"), "--seed", "0",
            "--report_to", "tensorboard",
        ]

        # ours
        ours_cmd = [
            sys.executable, str(runner), "-m", "adi_lightning", "fit",
            f"--model.pretrained_model_name_or_path={args.pipeline}", "--model.layerwise=false",
            "--model.mask_threshold=1.0", "--model.initializer_token=person", "--model.placeholder_token=<A>",
            "--model.learning_rate=5e-3", f"--data.root={args.data}", f"--data.action={args.action}",
            f"--data.resolution={args.resolution}", f"--data.batch_size={args.batch}", "--data.num_workers=0",
            "--data.repeats=100", f"--trainer.max_steps={args.steps}",
            f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "--trainer.devices=1",
            f"--trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={work / 'ours_out'}",
        ]
        runs = {"diffusers": ("diffusers textual_inversion.py", diffusers_cmd),
                "ours": ("adi_lightning TI", ours_cmd)}
        steps = {name: [] for name in runs}
        walls = {name: [] for name in runs}
        threads = {}
        for round_index in range(args.rounds):  # alternating order: drifting load hits both alike
            for name in (("diffusers", "ours") if round_index % 2 == 0 else ("ours", "diffusers")):
                label, cmd = runs[name]
                stamps = work / f"{name}-{round_index}-stamps.json"
                env["ADI_BENCH_STAMPS"] = str(stamps)
                walls[name].append(_run(cmd, env, f"{label} (round {round_index + 1})", work / f"{name}-{round_index}.log"))
                intervals, threads[name] = _step_times(stamps, args.warmup)
                steps[name] += intervals
        diffusers_steps, ours_steps = steps["diffusers"], steps["ours"]
        diffusers_wall, ours_wall = statistics.median(walls["diffusers"]), statistics.median(walls["ours"])
        diffusers_threads, ours_threads = threads["diffusers"], threads["ours"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    import torch

    if not diffusers_steps or not ours_steps:
        raise SystemExit("too few steps to time; raise --steps above --warmup + 1")
    print()
    print(f"pipeline={args.pipeline} images={len(anchors)} anchors of {args.action!r} resolution={args.resolution} "
          f"batch={args.batch} steps={args.steps} (timed: intervals after {args.warmup}, x{args.rounds} rounds) "
          f"precision={args.precision} "
          f"device={args.device}")
    print(f"torch {torch.__version__}, torch threads diffusers={diffusers_threads} ours={ours_threads}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average={os.getloadavg()[0]:.2f}, "
          f"date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    header = f"{'run':<34}{'step median s':>14}{'min':>9}{'max':>9}{'images/s':>10}{'process wall s':>16}"
    print(header)
    print("-" * len(header))
    for label, steps, wall in (("diffusers textual_inversion.py", diffusers_steps, diffusers_wall),
                               ("adi_lightning TI", ours_steps, ours_wall)):
        median = statistics.median(steps)
        print(f"{label:<34}{median:>14.4f}{min(steps):>9.4f}{max(steps):>9.4f}{args.batch / median:>10.2f}{wall:>16.1f}")
    ratio = statistics.median(diffusers_steps) / statistics.median(ours_steps)
    print()
    print(f"ours/diffusers speed = {ratio:.3f} (target >= 1.0)")
    print(f"ours_over_diffusers_speed={ratio:.4f}")


if __name__ == "__main__":
    main()
