"""Generated action-different partners, measured on the toy world.

1. Exports the toy folder for an action (exemplars + rendered partners), keeps the exemplars
   only, and lets the frozen toy backbone generate partners (``data.action_different: generate``).
2. Judges the generated partners with the exact toy judges: how often their action differs from
   the anchor's, and how often subject and background match the anchor's.
3. Trains ADI with rendered partners and with generated partners (same steps, seeds) and
   compares both-correct at test.

    python benchmarks/generated_partners_toy.py [--action jumping] [--steps 150] [--seeds 0 1]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from actionbench_toy import run_one  # noqa: E402  (same fit+test path as the benchmark)


def exemplar_only(folder: Path, action: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["action"] == action]
    for row in kept:
        shutil.copy(folder / row["file_name"], dest / row["file_name"])
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dest


def judge_partners(partners: Path, anchors: Path) -> dict[str, float]:
    from PIL import Image

    from adi_lightning.data import read_action_folder
    from adi_lightning.toy.judges import ToyJudges

    judges = ToyJudges()
    generated = read_action_folder(partners)
    by_anchor = {r.file_name: r for r in read_action_folder(anchors)}
    rows = [json.loads(line) for line in (partners / "metadata.jsonl").read_text().splitlines() if line.strip()]
    anchor_of = {r["file_name"]: r["anchor"] for r in rows}
    images = [Image.open(r.path).convert("RGB") for r in generated]
    anchor_images = [Image.open(by_anchor[anchor_of[r.file_name]].path).convert("RGB") for r in generated]
    seen, anchor_seen = judges.predict(images), judges.predict(anchor_images)
    n = len(generated)
    return {
        "partners": n,
        "action_differs": sum(a != b for a, b in zip(seen["action"], anchor_seen["action"])) / n,
        "action_is_requested": sum(a == r.action for a, r in zip(seen["action"], generated)) / n,
        "subject_matches": sum(a == b for a, b in zip(seen["subject"], anchor_seen["subject"])) / n,
        "background_matches": sum(a == b for a, b in zip(seen["background"], anchor_seen["background"])) / n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--action", default="jumping")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--test-seeds", type=int, default=4)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--generate-actions", nargs="+", default=["standing", "squatting"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adi_lightning.toy.export import ensure_action_folder

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="partners-") as tmp:
        tmp = Path(tmp)
        rendered = ensure_action_folder(tmp / "rendered", args.action)
        exemplars = exemplar_only(Path(rendered), args.action, tmp / "exemplars")
        generate = ["--data.action_different=generate", f"--data.generate_strength={args.strength}",
                    f"--data.generate_actions={args.generate_actions}", "--data.generate_per_anchor=1"]
        both = {"rendered": [], "generated": []}
        for seed in args.seeds:
            both["rendered"].append(run_one(args.action, "adi", seed, args.steps, args.test_seeds, tmp / "runs",
                                            [f"--data.root={rendered}"])["both_correct"])
            both["generated"].append(run_one(args.action, "adi", seed, args.steps, args.test_seeds, tmp / "runs",
                                             [f"--data.root={exemplars}", *generate])["both_correct"])
            print(f"[{time.time() - started:5.0f}s] seed {seed}: rendered {both['rendered'][-1]:.3f}, "
                  f"generated {both['generated'][-1]:.3f}", flush=True)
        quality = judge_partners(exemplars / ".adi_cache" / f"partners-{args.action}", exemplars)
    print(f"\ngenerated partners for {args.action!r} (strength {args.strength}, actions {args.generate_actions}):")
    for key, value in quality.items():
        print(f"  {key:<22}{value:.3f}" if isinstance(value, float) else f"  {key:<22}{value}")
    print(f"\nADI both-correct, {args.steps} steps, seeds {args.seeds}:")
    summary = {}
    for source, values in both.items():
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        summary[source] = {"both_correct": statistics.fmean(values), "std": spread}
        print(f"  {source:<10} partners: {statistics.fmean(values):.3f} ± {spread:.3f}")
    print(f"wall {time.time() - started:.0f} s")
    print(json.dumps({"partner_quality": quality, "adi_both_correct": summary}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
