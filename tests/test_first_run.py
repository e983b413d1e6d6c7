"""A researcher's first run: the mission's exact command from any directory, a summary at the end,
one helpful line for a typo, a console without library notices, readable grids, normal file modes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adi_lightning.cli import ADICLI, main
from adi_lightning.paths import ConfigNotFoundError, resolve_config

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)

REPO = Path(__file__).resolve().parents[1]
# The main job shortened: two 1-step starts (multi-start end to end), one more step, one judged image.
# Validation is due every step: those inside the starts (steps 1, 2) are skipped, step 3 is judged.
QUICK = ["--trainer.max_steps=3", "--trainer.val_check_interval=1", "--model.starts=2", "--model.start_steps=1",
         "--data.eval_subjects=[cat]",
         "--data.validation_seeds=[0]", "--model.num_inference_steps=2"]


def test_bare_config_name_resolves_from_the_repo_and_from_elsewhere(tmp_path, monkeypatch):
    here = ADICLI(args=["--config", "jump.yaml", f"--trainer.default_root_dir={tmp_path}"], run=False)
    monkeypatch.chdir(tmp_path)  # nothing of the project here: configs, presets and pipeline resolve anyway
    there = ADICLI(args=["--config", "jump.yaml", "--model", "configs/model/pplus.yaml",
                         f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert here.datamodule.action == there.datamodule.action == "jumping"
    assert there.model.hparams.mask_threshold == 1.0  # the preset, found by its project path
    assert there.trainer.max_steps == here.trainer.max_steps == 500


def test_a_missing_config_name_lists_the_experiments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigNotFoundError, match="jump.yaml"):
        resolve_config("jmup.yaml")
    with pytest.raises(SystemExit):
        main(args=["fit", "--config", "jmup.yaml"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("adi_lightning: error: --config jmup.yaml: no such file") and "toy_kicking.yaml" in line


def test_installed_package_resolves_the_shipped_experiments(tmp_path):
    """A wheel (not the checkout) ships experiments/ and configs/ inside the package."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                            "-w", str(wheel_dir)], capture_output=True, text=True, cwd=tmp_path)
    if build.returncode != 0:
        pytest.skip(f"could not build a wheel here: {build.stderr[-300:]}")
    shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = wheel_dir.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import adi_lightning.paths as p; from pathlib import Path; c = Path(p.resolve_config('jump.yaml')); "
            "print(c); print((c.parent / '../configs/model/toy.yaml').resolve().is_file())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)}, check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "True"


def test_fit_ends_with_a_summary_naming_the_identifier_grid_and_metrics(tmp_path, capsys):
    main(args=["fit", "--config", "jump.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", *QUICK])
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    out = capsys.readouterr().out.strip().splitlines()
    lines = out[[i for i, line in enumerate(out) if line.startswith("adi_lightning: fit finished in")][-1]:]
    assert f"run folder  {run}" in lines[1] and f"identifier  {run / 'identifier.safetensors'}" in lines[2]
    assert f"grid        {run / 'images' / 'validation_step000003.png'}" in lines[3]
    assert "plots       " in lines[4] and "validation at step 3 on 1 judged images:" in lines[5]
    assert "action_acc " in lines[6] and "(untrained " in lines[6] and "validation_step000003.json" in lines[-1]


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_key_typo_is_one_line_with_the_closest_key_and_its_file(where, tmp_path, capsys):
    typo = tmp_path / "mine.yaml"
    typo.write_text("data:\n  batch_size: 2\nmodel:\n  mask_treshold: 0.3\n")
    extra = ["--model.mask_treshold=0.3"] if where == "command line" else ["--config", str(typo)]
    with pytest.raises(SystemExit) as exit_:
        main(args=["fit", "--config", "jump.yaml", *extra])
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("adi_lightning: error: unknown key 'model.mask_treshold'")
    assert "did you mean model.mask_threshold" in line
    assert ("on the command line" in line) if where == "command line" else (f"in {typo}, line 4" in line)


def test_a_typo_inside_a_nested_config_file_names_that_file(tmp_path, capsys):
    trainer = tmp_path / "trainer.yaml"
    trainer.write_text("max_steps: 3\nmax_stepz: 3\n")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"trainer: {trainer.name}\n")
    with pytest.raises(SystemExit):
        main(args=["fit", "--config", "jump.yaml", "--config", str(experiment)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"unknown key 'trainer.max_stepz' in {trainer}, line 2; did you mean trainer.max_steps" in line


def test_top_level_help_is_this_programs(capsys):
    with pytest.raises(SystemExit):
        main(args=["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m adi_lightning") and "Lightning Trainer command line tool" not in out
    assert "Generate and judge the test prompts (every test seed) with a trained identifier." in " ".join(out.split())


NOTICES = ["tensorboardX", "litlogger", "LeafSpec", "Epoch 0/-2", "v_num", "Loading pipeline components",
           "Loading weights", "requires torchvision", "in eval mode at the start of training",
           "ActionBenchMetric was called before", "sync_dist=True", "all_gather is deprecated",
           "anonymous setting has no effect", "UserWarning"]


def test_main_job_console_has_no_library_notices(tmp_path):
    """The mission's command, shortened, in a fresh process (library notices fire at import)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "adi_lightning", "fit", "--config", "jump.yaml",
                          f"--trainer.default_root_dir={tmp_path}", *QUICK],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-2000:]
    assert [n for n in NOTICES if n in console] == [], console[-3000:]
    assert "multi-start: start 2 of 2 ended at step 2" in console and "multi-start: continuing start" in console
    assert "adi_lightning: fit finished in" in console


def test_ddp_fit_under_wandb_is_quiet_and_checkpoints_where_the_docs_say(tmp_path):
    """The main job, shortened, on 2 CPU ranks (as tests/test_ddp.py) under the shipped W&B logger
    (offline): no library notice; the checkpoint in <run>/checkpoints/, and the documented resume
    command (docs/cli.md) continues from it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "WANDB_MODE": "offline"}
    env.pop("ADI_RUN_DIR", None)
    logger = ["--trainer.logger", str(REPO / "configs" / "logger" / "wandb.yaml")]
    command = [sys.executable, "-m", "adi_lightning", "fit", "--config", "jump.yaml", *logger, *QUICK]
    run = subprocess.run([*command, f"--trainer.default_root_dir={tmp_path / 'ddp'}", "--trainer.devices=2",
                          "--trainer.strategy=ddp"], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-2000:]
    assert [n for n in NOTICES if n in console] == [], console[-3000:]
    (folder,) = [p for p in (tmp_path / "ddp").iterdir() if p.is_dir()]
    last = folder / "checkpoints" / "last.ckpt"
    assert last.is_file() and not list(folder.glob("adi-lightning/**/*.ckpt")), sorted(folder.rglob("*.ckpt"))
    resumed = subprocess.run([*command, f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--trainer.max_steps=4",
                              "--ckpt_path", str(last)], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-2000:]
    (again,) = [p for p in (tmp_path / "resumed").iterdir() if p.is_dir()]
    assert torch.load(again / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_readme_snippet_for_the_embedded_default_runs_as_written(tmp_path):
    """The README's plain-Python block for the toy pipeline, with only the run folder filled in (docs/inference.md
    holds the same block)."""
    import re

    main(args=["fit", "--config", "jump.yaml", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", "--trainer.max_steps=1", "--model.starts=1",
               "--trainer.limit_val_batches=0"])
    (identifier,) = tmp_path.glob("*/identifier.safetensors")
    snippets = []
    for page in ("README.md", "docs/inference.md"):
        blocks = re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), re.S)
        snippets += [b for b in blocks if "toy_pipeline_path" in b]
    assert len(snippets) == 2 and snippets[0] == snippets[1], snippets
    snippet = snippets[0]
    assert "outputs/<run>/identifier.safetensors" in snippet
    code = snippet.replace("outputs/<run>/identifier.safetensors", str(identifier))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "dog.png").is_file()
    assert "requires torchvision" not in run.stderr and "accelerate" not in run.stderr


def test_grid_labels_wrap_with_their_spaces():
    from PIL import Image, ImageDraw

    from adi_lightning.callbacks.image_log import LABEL_WIDTH, label_font, labelled_grid, wrap_label

    font, draw = label_font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    prompt = "a rendering of a corgi <A> on a beach at sunset beside a lighthouse, photographed on film"
    lines = wrap_label(prompt, draw, font, LABEL_WIDTH - 8)
    assert len(lines) > 1 and " ".join(lines) == prompt  # nothing cut, spaces kept
    assert all(draw.textlength(line, font=font) <= LABEL_WIDTH - 8 for line in lines)
    assert draw.textlength(" ", font=font) >= 3  # a space a reader can see
    grid = labelled_grid([Image.new("RGB", (32, 32))] * 2, [prompt, "a cat <A>"], ["seed 0"])
    assert grid.height >= 2 * 128


def test_outputs_get_the_users_usual_permissions(tmp_path):
    import torch
    from safetensors.torch import save_file

    from adi_lightning.io import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "identifier.safetensors") as tmp:
            save_file({"x": torch.zeros(1)}, str(tmp))  # safetensors itself creates files 0600
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "identifier.safetensors").stat().st_mode) == 0o644
