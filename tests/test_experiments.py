"""Every ``experiments/*.yaml`` parses and instantiates (model, data module, trainer).

Real-weight experiments name local folders (``models/...``, ``data/...``) that a test machine
does not have, so the backbone and data folder are always swapped for the session's tiny ones
(the tiny pipeline of the experiment's family: ``sdxl_*.yaml`` are SDXL experiments, ``sd3_*.yaml``
and ``*_sd3.yaml`` SD3 ones, whose toy backbone is built by a command, not shipped yet); every
other value must reach the instantiated objects as written. New experiments are picked up by
the glob.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from adi_lightning.cli import ADICLI
from adi_lightning.data import ActionTripleDataModule
from adi_lightning.module import ADIModule

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.yaml") if not p.is_symlink())
SWAPPED = {"pretrained_model_name_or_path", "root"}  # replaced by the tiny fixtures below
# Family name -> (tiny pipeline fixture, its attn2 layer count). The weights folder is not here to
# read its model_index.json, so an experiment's family is its file name's prefix.
TINY_BACKBONES = {"sd": ("tiny_pipeline", 16), "sdxl": ("tiny_sdxl_pipeline", 17), "sd3": ("tiny_sd3_pipeline_no_t5", 3)}


def family(experiment: Path) -> str:
    if experiment.stem.startswith("sdxl_"):
        return "sdxl"
    return "sd3" if experiment.stem.startswith("sd3_") or experiment.stem.endswith("_sd3") else "sd"


def test_there_are_experiments():
    names = {p.name for p in EXPERIMENTS}
    expected = {"tiny.yaml", "jump.yaml", "sd15_jump.yaml", "sd21_jump.yaml", "sdxl_jump.yaml", "jump_sd3.yaml"}
    assert expected <= names, names


def test_toy_jumping_is_the_main_job_itself():
    """The main job is ``jump.yaml``; ``toy_jumping.yaml`` (the per-action name the benchmark uses)
    is a link to it, so the two cannot drift."""
    link = REPO / "experiments" / "toy_jumping.yaml"
    assert link.is_symlink() and link.resolve() == (REPO / "experiments" / "jump.yaml").resolve()


def test_one_toy_experiment_per_action_differing_only_in_the_action():
    """ActionBench-toy compares methods across actions: every toy_<action>.yaml is the same run."""
    from adi_lightning.toy.world import ACTIONS

    reference = yaml.safe_load((REPO / "experiments" / "jump.yaml").read_text())
    for action in ACTIONS:
        config = yaml.safe_load((REPO / "experiments" / f"toy_{action}.yaml").read_text())
        assert config["data"]["action"] == action
        config["data"]["action"] = "jumping"
        assert config == reference, f"toy_{action}.yaml differs from jump.yaml beyond data.action"


def section(config: dict, key: str, config_path: Path) -> dict:
    """A config section, inline or a path to its own file (relative to the experiment)."""
    value = config.get(key) or {}
    if isinstance(value, str):
        value = yaml.safe_load((config_path.parent / value).read_text()) or {}
    return value


def plain(value) -> bool:
    """A literal the test can compare (not an interpolation, not a class_path block)."""
    if isinstance(value, str):
        return "${" not in value
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, (int, float, bool)) or value is None


@pytest.mark.e2e
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_instantiates(experiment, tiny_data, tmp_path, monkeypatch, request):
    fixture, layers = TINY_BACKBONES[family(experiment)]
    args = [
        "--config", str(experiment),
        f"--model.pretrained_model_name_or_path={request.getfixturevalue(fixture)}",
        f"--data.root={tiny_data}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    config = yaml.safe_load(experiment.read_text())
    trainer_cfg = section(config, "trainer", experiment)
    if trainer_cfg.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        args.append("--trainer.accelerator=cpu")

    cli = ADICLI(args=args, run=False)

    assert isinstance(cli.model, ADIModule)
    assert isinstance(cli.datamodule, ActionTripleDataModule)
    assert cli.trainer.max_steps > 0, "an experiment must bound its training (trainer.max_steps)"
    assert cli.model.family.name == family(experiment)
    assert cli.model.identifier.num_rows == (layers if cli.model.hparams.layerwise else 1)

    for key, value in section(config, "model", experiment).items():
        if key not in SWAPPED and plain(value):
            assert cli.model.hparams[key] == value, f"model.{key}"
    for key, value in section(config, "data", experiment).items():
        if key not in SWAPPED and plain(value):
            assert getattr(cli.datamodule, key) == value, f"data.{key}"
    if plain(trainer_cfg.get("max_steps")) and "max_steps" in trainer_cfg:
        assert cli.trainer.max_steps == trainer_cfg["max_steps"]
    assert cli.datamodule.with_partners == (cli.model.hparams.mask_threshold < 1.0)


def model_path(experiment: Path):
    return section(yaml.safe_load(experiment.read_text()), "model", experiment).get("pretrained_model_name_or_path")


# The toy experiments ship their backbone inside the package: only the others can miss their weights.
USER_WEIGHTS = [p for p in EXPERIMENTS if not str(model_path(p)).startswith("adi_lightning/")]


@pytest.mark.e2e
@pytest.mark.parametrize("experiment", USER_WEIGHTS, ids=lambda p: p.name)
def test_missing_local_weights_fail_naming_the_key(experiment, tmp_path, monkeypatch, capsys):
    """Without the user's weights folder, fit stops with one line naming the key (offline)."""
    model_path_ = model_path(experiment)
    if not isinstance(model_path_, str) or Path(model_path_).exists():
        pytest.skip(f"{experiment.name}: its weights folder {model_path_!r} exists on this machine, so there is "
                    "no missing-weights case to run")
    from adi_lightning.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        main(args=["fit", "--config", str(experiment), f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.accelerator=cpu"])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert f"model.pretrained_model_name_or_path={model_path_!r}" in err, err[-2000:]
    assert not list(tmp_path.rglob("identifier.safetensors"))


def test_the_sd3_main_job_is_the_main_job_on_the_toy_sd3_folder():
    """jump_sd3.yaml is jump.yaml with configs/model/toy_sd3.yaml, which is configs/model/toy.yaml with the
    toy SD3 folder: the two toy backbones are compared on the same run."""
    main, sd3 = (yaml.safe_load((REPO / "experiments" / name).read_text()) for name in ("jump.yaml", "jump_sd3.yaml"))
    assert sd3.pop("model") == "../configs/model/toy_sd3.yaml" and main.pop("model") == "../configs/model/toy.yaml"
    assert sd3 == main
    toy, toy_sd3 = (yaml.safe_load((REPO / "configs" / "model" / name).read_text())
                    for name in ("toy.yaml", "toy_sd3.yaml"))
    assert toy_sd3.pop("pretrained_model_name_or_path") == "adi_lightning/toy/assets/pipeline_sd3"
    toy.pop("pretrained_model_name_or_path")
    assert toy_sd3 == toy


def test_the_toy_sd3_folder_is_the_one_its_command_builds():
    from adi_lightning.paths import BUILT_BY_COMMAND, build_command
    from adi_lightning.toy import toy_sd3_pipeline_path

    folder = toy_sd3_pipeline_path()
    relative = folder.relative_to(REPO).as_posix()
    assert relative == "adi_lightning/toy/assets/pipeline_sd3" and relative in BUILT_BY_COMMAND
    assert build_command(relative) == build_command(folder) == BUILT_BY_COMMAND[relative]
    assert "python -m adi_lightning.toy pretrain-sd3" in build_command(relative)
    assert build_command("adi_lightning/toy/assets/pipeline") is None


# Experiments whose backbone folder a project command builds (not shipped yet).
BUILT = [p for p in EXPERIMENTS if str(model_path(p)).startswith("adi_lightning/") and "sd3" in str(model_path(p))]


@pytest.mark.e2e
@pytest.mark.parametrize("experiment", BUILT, ids=lambda p: p.name)
def test_an_unbuilt_toy_backbone_fails_naming_the_folder_and_its_command(experiment, tmp_path, capsys):
    """Until its folder is built, fit stops with one error line naming the key, the folder and the command."""
    from adi_lightning.cli import main
    from adi_lightning.paths import build_command, resolve_project_path

    folder = model_path(experiment)
    if Path(resolve_project_path(folder)).exists():
        pytest.skip(f"{folder} is built on this machine")
    with pytest.raises(SystemExit) as exc:
        main(args=["fit", "--config", str(experiment), f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.accelerator=cpu"])
    assert exc.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert f"model.pretrained_model_name_or_path={folder!r}: no such folder" in errors[0]
    assert errors[0].endswith(build_command(folder))
    assert not list(tmp_path.rglob("identifier.safetensors"))
