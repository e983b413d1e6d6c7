"""End to end through the real CLI entry point (``adi_lightning.cli.main``), in-process.

Every run uses the session's tiny pipeline and action folder and its own ``default_root_dir``;
one fit is shared (module fixture) by the tests that only read its outputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from adi_lightning.cli import ADICLI, RUN_DIR_ENV, main
from adi_lightning.identifier import read_identifier

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"
FIT_STEPS = 4
RESUME_STEPS = 6
PIXELS = 32  # the tiny pipeline's native image size
IDENTIFIER = "identifier.safetensors"


def base_args(pipeline: str, root: Path, data_root: str | None) -> list[str]:
    return [
        "--config", str(TINY),
        f"--model.pretrained_model_name_or_path={pipeline}",
        f"--data.root={data_root if data_root is not None else 'null'}",
        f"--trainer.default_root_dir={root}",
        "--model.num_inference_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


# The fits here (``short_fit(root, *FIT_FLAGS, steps=...)``): 2 inference steps, validation at FIT_STEPS,
# a checkpoint every 2 steps, the loss logged at every step.
FIT_FLAGS = ("--model.num_inference_steps=2", f"--trainer.val_check_interval={FIT_STEPS}",
             "--trainer.callbacks.every_n_train_steps=2", "--trainer.log_every_n_steps=1")


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def only_new_run(root: Path, before: list[Path]) -> Path:
    new = [p for p in run_dirs(root) if p not in before]
    assert len(new) == 1, f"expected exactly one new run folder under {root}, got {new}"
    return new[0]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """``relative path -> (mtime_ns, sha256)`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def grid_cells(size: tuple[int, int], cols: int) -> tuple[int, int]:
    """(columns, rows) of a labelled grid: 32 px images shown as 128 px cells under the seed
    header, right of the prompt-label column (short prompts: one cell high)."""
    from adi_lightning.callbacks.image_log import HEADER, LABEL_WIDTH

    width, height = size
    assert (height - HEADER) % 128 == 0 and width - cols * 128 == LABEL_WIDTH
    return cols, (height - HEADER) // 128


def _layout():
    from adi_lightning.callbacks.image_log import HEADER, LABEL_WIDTH

    return HEADER, LABEL_WIDTH


HEADER_PX, LABEL_PX = _layout()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, got {found}"
    return found[0]


def training_steps(run: Path) -> list[int]:
    rows = []
    for metrics in run.rglob("metrics.csv"):
        with open(metrics, newline="") as handle:
            rows += [int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    return rows


@pytest.fixture(scope="module")
def first_fit(short_fit, tmp_path_factory):
    """One short masked fit, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("fit_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(RUN_DIR_ENV, raising=False)
        mp.setattr("sys.argv", ["adi_lightning"])
        short_fit(root, *FIT_FLAGS, steps=FIT_STEPS)
    runs = run_dirs(root)
    assert len(runs) == 1, f"fit must create exactly one run folder, got {runs}"
    return root, runs[0]


# ------------------------------------------------------------------------------------------- fit
def test_fit_writes_one_run_folder_with_all_outputs(first_fit, make_module, tiny_pipeline):
    root, run = first_fit
    for name in (IDENTIFIER, "config.yaml", "run_info.json"):
        assert (run / name).is_file(), f"{name} missing from {run}"
    assert list(run.rglob("*.ckpt")), "no checkpoint written"
    assert list((run / "images").glob("validation_step*.png")), "no validation grid written"

    table, meta = read_identifier(run / IDENTIFIER)
    assert tuple(table.shape) == (16, 32)
    assert torch.isfinite(table).all()
    for key in ("format", "layer_paths", "placeholder_token", "base_model", "git_revision", "package_versions"):
        assert meta.get(key), f"identifier metadata lacks {key!r}: {sorted(meta)}"
    assert len(json.loads(meta["layer_paths"])) == 16
    assert meta["placeholder_token"] == "<A>"
    assert meta["base_model"] == tiny_pipeline
    assert json.loads(meta["package_versions"])["torch"] == torch.__version__
    assert meta["global_step"] == str(FIT_STEPS)

    init = make_module().identifier.embedding.detach()
    assert init.shape == table.shape
    assert not torch.allclose(table, init), "training did not move the identifier"
    assert (table - init).abs().amax(dim=1).gt(0).all(), "some layer's row never moved"

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["pretrained_model_name_or_path"] == tiny_pipeline
    assert config["trainer"]["max_steps"] == FIT_STEPS
    assert Path(config["trainer"]["default_root_dir"]) == run
    info = json.loads((run / "run_info.json").read_text())
    assert info["stage"] == "fit"
    assert info["identifier"]["rows"] == 16 and info["identifier"]["dim"] == 32


def test_second_fit_gets_its_own_folder_and_leaves_the_first_alone(first_fit, short_fit):
    root, run = first_fit
    before_files = snapshot(run)
    before_runs = run_dirs(root)
    short_fit(root, *FIT_FLAGS, steps=2)
    second = only_new_run(root, before_runs)
    assert second != run
    assert (second / IDENTIFIER).is_file()
    assert snapshot(run) == before_files, "the second fit touched the first run's files"


def test_checkpoint_holds_only_the_identifier(first_fit):
    _, run = first_fit
    last = one(run, "**/last.ckpt")
    assert last.stat().st_size < 200_000, f"{last} is {last.stat().st_size} bytes: backbone weights saved?"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("identifier.") for k in keys), keys
    assert ckpt["global_step"] == FIT_STEPS


def test_resume_from_last_checkpoint_continues_the_step_count(first_fit, short_fit, tmp_path):
    _, run = first_fit
    last = one(run, "**/last.ckpt")
    short_fit(tmp_path, *FIT_FLAGS, f"--ckpt_path={last}", steps=RESUME_STEPS)
    resumed = only_new_run(tmp_path, [])
    _, meta = read_identifier(resumed / IDENTIFIER)
    assert meta["global_step"] == str(RESUME_STEPS)
    steps = training_steps(resumed)
    assert steps, "the resumed run logged no training loss"
    assert min(steps) >= FIT_STEPS - 1 and max(steps) <= RESUME_STEPS, steps  # CSV steps are 0-based
    assert len(steps) == RESUME_STEPS - FIT_STEPS, steps
    ckpt = torch.load(one(resumed, "**/last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == RESUME_STEPS


# ----------------------------------------------------------------------------- generation stages
def generate(short_fit, subcommand: str, identifier: Path, root: Path) -> Path:
    before = run_dirs(root)
    short_fit(root, "--model.num_inference_steps=2", f"--model.identifier_path={identifier}", subcommand=subcommand,
              data="null")
    run = only_new_run(root, before)
    assert not (run / IDENTIFIER).exists(), f"{subcommand} must not write an identifier"
    return run


def test_predict_writes_seeded_grids_and_images(first_fit, short_fit, tmp_path):
    _, run = first_fit
    config = yaml.safe_load(TINY.read_text())
    data = yaml.safe_load((TINY.parent / config["data"]).read_text())
    prompts, seeds = data["predict_prompts"], data["predict_seeds"]

    grids = []
    for _ in range(2):
        out = generate(short_fit, "predict", run / IDENTIFIER, tmp_path)
        grid = one(out / "images", "predict_step*.png")
        with Image.open(grid) as img:
            assert grid_cells(img.size, len(seeds)) == (len(seeds), len(prompts))
        sidecar = json.loads(grid.with_suffix(".json").read_text())
        assert sidecar["rows_prompts"] == prompts and sidecar["columns_seeds"] == seeds
        singles = sorted((out / "images" / "predict").glob("*.png"))
        assert len(singles) == len(prompts) * len(seeds)
        with Image.open(singles[0]) as img:
            assert img.size == (PIXELS, PIXELS)
        grids.append(pixels(grid))
    assert len(run_dirs(tmp_path)) == 2
    np.testing.assert_array_equal(grids[0], grids[1], err_msg="same seeds must give the same pixels")
    assert grids[0].std() > 0, "blank grid"


@pytest.mark.parametrize("subcommand, stage", [("validate", "validation"), ("test", "test")])
def test_validate_and_test_write_grids(first_fit, short_fit, tmp_path, subcommand, stage):
    _, run = first_fit
    out = generate(short_fit, subcommand, run / IDENTIFIER, tmp_path)
    grid = one(out / "images", f"{stage}_step*.png")
    with Image.open(grid) as img:  # tiny.yaml: 2 validation prompts x 2 seeds, each beside its untrained image
        assert grid_cells(img.size, 4) == (4, 2)
    sidecar = json.loads(grid.with_suffix(".json").read_text())
    assert sidecar["columns"] == ["seed 0", "seed 0 untrained", "seed 1", "seed 1 untrained"]
    # the untrained column is the untrained identifier's image: the trained one differs from it
    cells = pixels(grid)[HEADER_PX:HEADER_PX + 128, LABEL_PX:LABEL_PX + 2 * 128]
    assert not np.array_equal(cells[:, :128], cells[:, 128:])
    assert (out / "config.yaml").is_file()


# ------------------------------------------------------------------------------------ error paths
@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.pretrained_model_name_or_path={tmp}/no_such_pipeline", "model.pretrained_model_name_or_path"),
        ("--model.mask_threshold=1.5", "mask_threshold"),
        ("--model.placeholder_token=photo", "model.placeholder_token 'photo' already exists"),
        ("--data.root=null", "data.root"),
    ],
    ids=["unknown_model", "mask_threshold", "placeholder_in_vocab", "no_data_root"],
)
def test_input_errors_exit_with_a_message_naming_the_key(override, expected, short_fit, tmp_path, capsys):
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        short_fit(root, *FIT_FLAGS, override.format(tmp=tmp_path), steps=FIT_STEPS)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert expected in err, err[-2000:]
    assert "Traceback" not in err
    assert not list(tmp_path.rglob(IDENTIFIER)), "a failed run wrote an identifier"
    assert not list(tmp_path.rglob("*.ckpt")), "a failed run wrote a checkpoint"


# ------------------------------------------------------------------- linked keys, P+ without partners
def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        main(args=[*args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_mask_threshold_one_links_with_partners_off(tiny_pipeline, tiny_data, tmp_path, capsys):
    args = base_args(tiny_pipeline, tmp_path, tiny_data)
    printed = print_config(["fit", *args, "--model.mask_threshold=1.0"], capsys)
    assert printed["model"]["mask_threshold"] == 1.0
    # jsonargparse strips link targets from every dump: the link is not a settable key.
    assert "with_partners" not in printed["data"]
    for beta, partners in ((1.0, False), (0.5, True)):
        cli = ADICLI(args=[*args, f"--model.mask_threshold={beta}"], run=False)
        assert cli.datamodule.with_partners is partners
        assert cli.model.masking_enabled is partners


def test_p_plus_fit_needs_only_the_target_action(short_fit, tiny_data, tmp_path, capsys):
    source = Path(tiny_data)
    only = tmp_path / "jumping_only"
    only.mkdir()
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["action"] == "jumping"]
    assert 0 < len(kept) < len(rows)
    for row in kept:
        (only / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / row["file_name"], only / row["file_name"])
    (only / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    # With masking on, the same folder lacks action-different partners: a clear error, no identifier.
    with pytest.raises(SystemExit):
        short_fit(tmp_path / "runs_masked", *FIT_FLAGS, "--model.mask_threshold=0.5", steps=2, data=str(only))
    assert "other than 'jumping'" in capsys.readouterr().err
    assert not list((tmp_path / "runs_masked").rglob(IDENTIFIER))

    # The method presets (configs/model/pplus.yaml, ti.yaml) switch masking off the same way.
    for preset, rows in ((None, 16), ("pplus", 16), ("ti", 1)):
        root = tmp_path / f"runs_{preset}"
        extra = ["--model.mask_threshold=1.0"] if preset is None else ["--model", str(REPO / "configs" / "model" / f"{preset}.yaml")]
        short_fit(root, *FIT_FLAGS, *extra, steps=2, data=str(only))
        run = only_new_run(root, [])
        table, meta = read_identifier(run / IDENTIFIER)
        assert meta["mask_threshold"] == "1.0" and meta["global_step"] == "2"
        # Settings not in force are recorded as null, and the keys tiny.yaml sets for masking get one note.
        assert meta["mask_combine"] == meta["mask_statistic"] == meta["update_from"] == meta["large_t_min"] == "null"
        assert json.loads(meta["starts"]) == {"starts": 1, "start_steps": None}
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adi_lightning: note:")]
        assert len(notes) == 1 and "model.mask_combine, model.update_from, data.action_different (model." \
            "mask_threshold=1.0 turns masking off" in notes[0], notes
        assert tuple(table.shape) == (rows, 32)
        assert torch.isfinite(table).all()


def test_guidance_scale_parses_as_a_number_or_null_from_yaml_and_the_command_line(tiny_pipeline, tiny_data,
                                                                                    tmp_path, capsys):
    """``model.guidance_scale: float | None``: null means the family's default (resolved by the module); a
    config's value (experiments/tiny.yaml: 3.0) is kept as it is."""
    args = ["fit", *base_args(tiny_pipeline, tmp_path, tiny_data)]
    assert print_config(args, capsys)["model"]["guidance_scale"] == 3.0
    assert print_config([*args, "--model.guidance_scale=5"], capsys)["model"]["guidance_scale"] == 5.0
    assert print_config([*args, "--model.guidance_scale=null"], capsys)["model"]["guidance_scale"] is None
    config = tmp_path / "guidance.yaml"
    config.write_text("model:\n  guidance_scale: 4.5\n")
    assert print_config([*args, "--config", str(config)], capsys)["model"]["guidance_scale"] == 4.5


# ------------------------------------------------------------------------ omegaconf+ interpolation
def test_command_line_override_reaches_interpolated_keys(tiny_pipeline, tiny_data, tmp_path, capsys):
    config = tmp_path / "interp.yaml"
    config.write_text(
        f"trainer: {REPO / 'configs' / 'trainer' / 'cpu.yaml'}\n"
        f"data: {REPO / 'configs' / 'data' / 'tiny.yaml'}\n"
        "model:\n"
        f"  pretrained_model_name_or_path: {tiny_pipeline}\n"
        "  learning_rate: 0.01\n"
        "  guidance_scale: ${model.learning_rate}\n"
    )
    args = ["fit", "--config", str(config), f"--data.root={tiny_data}", f"--trainer.default_root_dir={tmp_path}"]
    printed = print_config(args, capsys)
    assert printed["model"]["guidance_scale"] == 0.01
    printed = print_config([*args, "--model.learning_rate=0.25"], capsys)
    assert printed["model"]["learning_rate"] == 0.25
    assert printed["model"]["guidance_scale"] == 0.25
