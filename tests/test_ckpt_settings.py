"""Settings with ``--ckpt_path``: defaults < ``--config`` < checkpoint < flags typed on the command
line, in fit (resume), validate, test and predict; ``config.yaml`` and the optimizer obey it.

The first fit trains from a copy of the tiny pipeline with a typed learning rate (0.01; the config
says 0.005) and an identifier file, and both the copy and the file are removed afterwards: the
checkpoint then names a backbone and an identifier that no longer exist, as after a move.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from adi_lightning.cli import main
from adi_lightning.identifier import read_identifier

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"
NO_VAL = "--trainer.val_check_interval=100"


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args=args)
    assert exc.value.code == 1, exc.value.code
    err = capsys.readouterr().err
    assert "adi_lightning: error: " in err, err
    return err


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _last(run: Path) -> Path:
    (last,) = run.rglob("last.ckpt")
    return last


@pytest.fixture(scope="module")
def moved(short_fit, tiny_pipeline, tiny_data, tmp_path_factory):
    """``(checkpoint, data folder)`` of a 2-step fit whose backbone copy and identifier file are gone."""
    base = tmp_path_factory.mktemp("moved")
    backbone = base / "old_backbone"
    shutil.copytree(tiny_pipeline, backbone)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["adi_lightning"])
        start = short_fit(base / "start", steps=1)
        identifier = base / "start.safetensors"
        shutil.copy(start / "identifier.safetensors", identifier)
        run = short_fit(base / "runs", f"--model.identifier_path={identifier}", "--model.learning_rate=0.01", NO_VAL,
                        "--trainer.callbacks.every_n_train_steps=2", steps=2, pipeline=str(backbone))
    shutil.rmtree(backbone)
    identifier.unlink()
    return _last(run), tiny_data


def _resume_flags(ckpt: Path | str, *extra: str) -> tuple[str, ...]:
    """Flags of the 3-step fit that resumes ``ckpt`` (``short_fit(root, *_resume_flags(ckpt), steps=3)``)."""
    return (NO_VAL, f"--ckpt_path={ckpt}", *extra)


def test_resume_keeps_the_checkpoint_over_the_config_and_needs_no_identifier_file(moved, short_fit, tiny_pipeline,
                                                                                 tmp_path):
    ckpt, data = moved
    run = short_fit(tmp_path, *_resume_flags(ckpt), steps=3, data=data)
    config = _config(run)
    assert config["model"]["learning_rate"] == 0.01  # the checkpoint's; the config file says 0.005
    assert config["model"]["pretrained_model_name_or_path"] == tiny_pipeline  # typed: the new location
    assert config["model"]["identifier_path"] is None  # the identifier comes from the checkpoint
    assert config["ckpt_path"] == str(ckpt)
    state = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01


def test_typed_learning_rate_beats_the_checkpoint_in_config_and_optimizer(moved, short_fit, tmp_path, capsys):
    ckpt, data = moved
    run = short_fit(tmp_path, *_resume_flags(ckpt, "--model.learning_rate=0.5", "--model.weight_decay=0.02"), steps=3,
                    data=data)
    assert "model.learning_rate=0.5 (checkpoint: 0.01)" in capsys.readouterr().err
    assert _config(run)["model"]["learning_rate"] == 0.5
    assert _config(run)["model"]["weight_decay"] == 0.02
    state = torch.load(_last(run), map_location="cpu", weights_only=True)
    group = state["optimizer_states"][0]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (0.5, 0.02)
    assert state["hyper_parameters"]["learning_rate"] == 0.5


@pytest.mark.parametrize("subcommand", ["predict", "validate", "test"])
def test_typed_generation_settings_beat_the_checkpoint(moved, short_fit, tmp_path, subcommand):
    ckpt, _ = moved  # trained with guidance 3.0 and 4 steps (experiments/tiny.yaml)
    run = short_fit(tmp_path, "--model.guidance_scale=7.5", "--model.num_inference_steps=2", f"--ckpt_path={ckpt}",
                    subcommand=subcommand, data="null")
    model = _config(run)["model"]
    assert (model["guidance_scale"], model["num_inference_steps"]) == (7.5, 2)


def test_a_moved_backbone_is_named_with_the_flag_to_give(moved, tiny_pipeline, tmp_path, capsys):
    ckpt, data = moved
    args = ["fit", "--config", str(TINY), f"--data.root={data}", f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={ckpt}"]
    err = _refused(args, capsys)
    assert "old_backbone" in err and str(ckpt) in err
    assert "--model.pretrained_model_name_or_path=PATH" in err
    assert not _runs(tmp_path)


def test_a_value_that_cannot_change_on_resume_is_refused_by_name(moved, short_fit, tmp_path, capsys):
    ckpt, data = moved
    err = _refused(short_fit.args(tmp_path, *_resume_flags(ckpt, "--model.layerwise=false"), steps=3, data=data), capsys)
    assert "model.layerwise=False cannot change on resume" in err and "model.layerwise=True" in err


def test_an_identifier_file_and_a_checkpoint_together_are_refused(moved, short_fit, tmp_path, capsys):
    ckpt, data = moved
    err = _refused(short_fit.args(tmp_path, *_resume_flags(ckpt, "--model.identifier_path=some.safetensors"), steps=3,
                                  data=data), capsys)
    assert "model.identifier_path" in err and "--ckpt_path" in err


def test_a_checkpoint_alone_fills_model_and_data(moved, short_fit, tmp_path):
    ckpt, data = moved
    run = short_fit(tmp_path, f"--ckpt_path={ckpt}", "--trainer.accelerator=cpu", steps=3, config=None, data=None)
    config = _config(run)
    assert config["model"]["learning_rate"] == 0.01 and config["model"]["num_inference_steps"] == 4
    assert config["data"]["root"] == data and config["data"]["resolution"] == 32
    assert read_identifier(run / "identifier.safetensors")[1]["global_step"] == "3"


def test_a_checkpoint_alone_says_what_to_add(moved, tiny_pipeline, tmp_path, capsys):
    ckpt, _ = moved
    err = _refused(["fit", f"--ckpt_path={ckpt}", f"--model.pretrained_model_name_or_path={tiny_pipeline}",
                    f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert "--trainer.max_steps=N" in err
    bare = torch.load(ckpt, map_location="cpu", weights_only=True)
    del bare["hyper_parameters"]
    torch.save(bare, tmp_path / "bare.ckpt")
    err = _refused(["predict", f"--ckpt_path={tmp_path / 'bare.ckpt'}", f"--trainer.default_root_dir={tmp_path}"],
                   capsys)
    assert "stores no model.pretrained_model_name_or_path" in err
    assert "add --model.pretrained_model_name_or_path=PATH" in err



def test_a_ckpt_path_from_a_config_file_gets_the_same_precedence(moved, short_fit, tmp_path):
    ckpt, data = moved
    extra = tmp_path / "resume.yaml"
    extra.write_text(yaml.safe_dump({"ckpt_path": str(ckpt)}))
    run = short_fit(tmp_path / "runs", "--config", str(extra), "--model.weight_decay=0.03", steps=3, data=data)
    model = _config(run)["model"]
    assert (model["learning_rate"], model["weight_decay"]) == (0.01, 0.03)  # stored over the config, typed over both


def test_an_identifier_that_does_not_fit_the_backbone_is_refused():
    from types import SimpleNamespace

    from adi_lightning.resume import check_identifier_fits

    identifier = SimpleNamespace(layer_paths=["a", "b"], num_rows=2, dim=32)
    check_identifier_fits({"state_dict": {"identifier.embedding": torch.zeros(2, 32)}}, identifier)
    with pytest.raises(ValueError, match=r"is \(2, 64\) \(rows, width\) but .* need \(2, 32\)"):
        check_identifier_fits({"state_dict": {"identifier.embedding": torch.zeros(2, 64)}}, identifier)
    with pytest.raises(ValueError, match="different cross-attention layers"):
        check_identifier_fits({"state_dict": {"identifier.embedding": torch.zeros(2, 32)},
                               "adi_identifier": {"layer_paths": ["a", "c"]}}, identifier)


def test_a_run_folder_as_ckpt_path_resumes_from_its_newest_checkpoint(moved, short_fit, tmp_path, capsys):
    ckpt, data = moved
    folder = ckpt.parents[1]  # <run>/checkpoints/last.ckpt
    newest = max(folder.rglob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    run = short_fit(tmp_path, *_resume_flags(folder), steps=3, data=data)
    assert f"adi_lightning: --ckpt_path {folder}: using its newest checkpoint, {newest}" in capsys.readouterr().err
    assert _config(run)["ckpt_path"] == str(newest)
    assert _config(run)["model"]["learning_rate"] == 0.01  # the checkpoint's settings, as for a file
    assert torch.load(_last(run), map_location="cpu", weights_only=True)["global_step"] == 3


def test_ckpt_path_last_names_the_newest_checkpoint_under_the_root(moved, short_fit, tmp_path, capsys):
    ckpt, data = moved
    root = ckpt.parents[2]
    newest = max(root.rglob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    args = short_fit.args(root, *_resume_flags("last"), steps=3, data=data)
    before = sorted(root.rglob("*"))
    err = _refused(args, capsys)
    assert f"--ckpt_path last is ambiguous here: this command's run folder {root}/" in err
    assert f"e.g. the newest under {root}: --ckpt_path {newest}" in err
    assert sorted(root.rglob("*")) == before  # the refused command's new folder is gone


@pytest.mark.parametrize("pipeline, key, typed, stored, note", [
    ("tiny_flux_pipeline", "model.guidance_scale", None, 3.5, None),  # null: FLUX's 3.5, the checkpoint's
    ("tiny_flux_pipeline", "model.guidance_scale", None, 7.5, "model.guidance_scale=None (flux's default 3.5) "
                                                              "(checkpoint: 7.5)"),  # a checkpoint from before 3.5
    ("tiny_pipeline", "model.guidance_scale", None, 7.5, None),
    ("tiny_flux_pipeline", "model.guidance_scale", 5.0, 3.5, "model.guidance_scale=5.0 (checkpoint: 3.5)"),
    ("tiny_flux_pipeline", "data.generate_guidance", 3.5, None, None),  # the checkpoint's unset is FLUX's 3.5
    ("tiny_pipeline", "data.generate_guidance", 3.5, None, "data.generate_guidance=3.5 (checkpoint: None)")])
def test_a_typed_guidance_is_compared_with_the_checkpoint_by_the_value_in_force(request, pipeline, key, typed, stored,
                                                                               note, capsys):
    """model.guidance_scale and data.generate_guidance unset (null) are the backbone family's default: typed over
    a checkpoint, the note names them only when the value in force differs from the checkpoint's."""
    from jsonargparse import Namespace

    from adi_lightning.arguments import split_options
    from adi_lightning.resume import CheckpointSettings

    group, name = key.split(".")
    flag = f"--{key}={'null' if typed is None else typed}"
    settings = CheckpointSettings("run.ckpt", "predict", [], split_options([flag]), {group: {name: stored}})
    config = Namespace(model=Namespace(pretrained_model_name_or_path=request.getfixturevalue(pipeline)),
                       data=Namespace(), trainer=Namespace(max_steps=-1, max_epochs=None))
    config[key] = typed
    capsys.readouterr()  # the pipeline's building bars
    settings.check_parsed(config)
    err = capsys.readouterr().err
    assert err == ("" if note is None else f"adi_lightning: typed over the checkpoint's settings: {note}\n"), err
