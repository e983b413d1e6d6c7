"""What a failed fit leaves, through the CLI on experiments/tiny.yaml (docs/troubleshooting.md, docs/outputs.md "A failed run").

Kept when it holds a result, with the last good identifier; removed when it holds only
bookkeeping. The no-folder and NaN rows of the table are also in tests/test_bad_inputs.py.
"""

import csv
import signal
from pathlib import Path

import pytest
import torch

from adi_lightning.identifier import read_identifier

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)

LAST_GOOD_FILE = "identifier_last_good.safetensors"  # the name docs/outputs.md documents


# Every fit here: no validation, the training loss logged at every step.
FLAGS = ("--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1")


def only_run(root: Path) -> Path:
    [run] = [p for p in root.iterdir() if p.is_dir()]
    return run


def logged_steps(run: Path) -> list[int]:
    [metrics] = run.rglob("metrics.csv")
    with open(metrics, newline="") as handle:
        return [int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.fixture(scope="module")
def one_step_identifier(short_fit, tmp_path_factory):
    """The identifier of a clean one-step fit: what the failed runs below must keep."""
    root = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["adi_lightning"])
        short_fit(root, *FLAGS, steps=1)
    return read_identifier(only_run(root) / "identifier.safetensors")


ERRORS = {"nan_loss": None, "exception": RuntimeError("boom in step 2"), "ctrl_c": KeyboardInterrupt()}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_a_fit_failing_after_steps_keeps_its_folder_with_the_last_good_identifier(
        kind, one_step_identifier, short_fit, tmp_path, capsys, fail_fit_at, monkeypatch):
    error = ERRORS[kind]
    fail_fit_at(2, error)
    # After a KeyboardInterrupt Lightning sets SIGINT to "ignore": keep that out of the test process.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    root = tmp_path / "runs"
    expected_exit = RuntimeError if kind == "exception" else SystemExit  # a bug keeps its traceback
    with pytest.raises(expected_exit) as info:
        short_fit(root, *FLAGS, steps=4)
    if expected_exit is SystemExit:
        assert info.value.code == 1
    run = only_run(root)
    err = capsys.readouterr().err
    assert f"adi_lightning: the failed run's folder is kept: {run} (it holds {LAST_GOOD_FILE}, lightning_logs/" in err

    # The last identifier whose training loss was finite: after step 1, exactly the clean run's.
    table, meta = read_identifier(run / LAST_GOOD_FILE)
    clean_table, clean_meta = one_step_identifier
    assert meta["global_step"] == clean_meta["global_step"] == "1"
    assert torch.equal(table, clean_table)
    stopped = {"nan_loss": "FloatingPointError: non-finite training loss (nan) at global step 2",
               "exception": "RuntimeError: boom in step 2", "ctrl_c": "KeyboardInterrupt"}[kind]
    assert meta["stopped_by"].startswith(stopped)
    assert logged_steps(run) == [0, 1]
    assert not (run / "identifier.safetensors").exists()  # that name is for the end of a run, or a checkpoint
    assert not list(run.rglob(".*.tmp"))


def test_a_fit_failing_at_its_first_step_leaves_no_folder(short_fit, tmp_path, capsys, fail_fit_at):
    fail_fit_at(0)
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        short_fit(root, *FLAGS, steps=4)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "adi_lightning: error: non-finite training loss (nan) at global step 0" in err
    assert "folder is kept" not in err
    assert [p for p in root.rglob("*")] == []
