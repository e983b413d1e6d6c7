"""Every callback a run uses is named in ``--print_config`` and the saved ``config.yaml``, a user's
own callback (``--trainer.callbacks+=...``) runs beside the method's, and ``--help`` shows keys, not links."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from adi_lightning import callbacks
from adi_lightning.cli import ADICLI, main
from adi_lightning.module import METHOD_CALLBACKS

pytestmark = pytest.mark.e2e

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml"


class CountSteps(Callback):
    """A user's callback: counts the training steps it saw."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


def _args(pipeline: str, data: str, root: Path) -> list[str]:
    return ["fit", "--config", str(TINY), f"--model.pretrained_model_name_or_path={pipeline}", f"--data.root={data}",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_print_config_names_the_methods_callbacks(tiny_pipeline, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args=[*_args(tiny_pipeline, tiny_data, tmp_path), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    header = printed[:printed.index("seed_everything:")]
    for name in METHOD_CALLBACKS:
        assert f"#   adi_lightning.callbacks.{name}\n" in header, header
    assert "--trainer.callbacks+=" in header


def test_a_users_callback_runs_beside_the_methods_and_the_config_yaml_names_them_all(
        tiny_pipeline, tiny_data, tmp_path):
    user = f"{__name__}.CountSteps"
    cli = ADICLI(args=[*_args(tiny_pipeline, tiny_data, tmp_path), f"--trainer.callbacks+={user}"])
    used = cli.trainer.callbacks
    [counter] = [c for c in used if isinstance(c, CountSteps)]
    assert counter.steps == 2
    assert any(isinstance(c, ModelCheckpoint) for c in used)  # the config file's callback is kept too
    for name in METHOD_CALLBACKS:
        assert sum(isinstance(c, getattr(callbacks, name)) for c in used) == 1, name
    text = (Path(cli.trainer.default_root_dir) / "config.yaml").read_text()
    header, body = text.split("seed_everything:", 1)
    for name in METHOD_CALLBACKS:
        assert f"adi_lightning.callbacks.{name}" in header, name
    assert f"class_path: {user}" in body and "class_path: lightning.pytorch.callbacks.ModelCheckpoint" in body


def test_help_shows_keys_not_links(capsys):
    with pytest.raises(SystemExit):
        main(args=["fit", "--help"])
    shown = capsys.readouterr().out
    assert "--model.mask_threshold" in shown
    assert "<lambda>" not in shown and "-->" not in shown and "Linked arguments" not in shown
