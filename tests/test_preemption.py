"""Preemption (docs/distributed.md): SIGTERM is an error (exit 143) with one line naming
the checkpoint to resume from, written at the next optimizer-step boundary; a requeued SLURM job
(simulated with environment variables, no real cluster) rejoins its run folder and resumes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from adi_lightning.cli import main
from adi_lightning.identifier import read_identifier

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)

REPO = Path(__file__).resolve().parents[1]
NO_VAL = "--trainer.limit_val_batches=0"
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "SLURM_STEP_ID",
             "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
             "SLURM_NODELIST", "SLURM_NTASKS_PER_NODE")


def test_sigterm_exits_143_naming_a_checkpoint_that_resumes(short_fit, tmp_path):
    root = tmp_path / "runs"
    args = short_fit.args(root, NO_VAL, "--trainer.callbacks.every_n_train_steps=2", steps=10_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adi_lightning", *args], cwd=REPO, env=env,  # this checkout
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list(root.rglob("epoch=0-step=2.ckpt")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    [line] = [l for l in err.splitlines() if l.startswith("adi_lightning: stopped by")]
    prefix = "adi_lightning: stopped by SIGTERM at step "
    assert line.startswith(prefix) and "; resume with: python -m adi_lightning fit " in line, line
    step = int(line[len(prefix):].split(";")[0])
    command = shlex.split(line.split("; resume with: ", 1)[1])
    ckpt = Path(command[command.index("--ckpt_path") + 1])
    assert ckpt.name == f"stopped-step={step}.ckpt" and step >= 2
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == step

    # The named command resumes: two more steps, identical to an uninterrupted run of step + 2.
    assert command[:3] == ["python", "-m", "adi_lightning"]
    resumed_root, straight_root = tmp_path / "resumed", tmp_path / "straight"
    main(args=[*command[3:], f"--trainer.default_root_dir={resumed_root}", f"--trainer.max_steps={step + 2}"])
    short_fit(straight_root, NO_VAL, steps=step + 2)
    [resumed] = list(resumed_root.glob("*/identifier.safetensors"))
    [straight] = list(straight_root.glob("*/identifier.safetensors"))
    assert read_identifier(resumed)[1]["global_step"] == str(step + 2)
    assert torch.equal(read_identifier(resumed)[0], read_identifier(straight)[0])


class _SigtermAt(L.Callback):
    """Sets Lightning's SIGTERM flag (what its handler does) at the end of batch ``batch_idx``."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            trainer._signal_connector.received_sigterm = True


def _accumulating(short_fit, root, max_steps, ckpt_path=None, callbacks=()):
    """Batch 1, two batches per optimizer step (accumulate_grad_batches=2), a checkpoint per epoch."""
    return short_fit.trainer(root, max_steps, callbacks=[ModelCheckpoint(dirpath=root / "ckpt"), *callbacks],
                             ckpt_path=ckpt_path, batch_size=1, accumulate_grad_batches=2)


def test_sigterm_mid_accumulation_checkpoints_at_the_next_step_and_resumes_bit_identically(
        short_fit, tmp_path):
    # Batches 0-1 are step 1, batches 2-3 step 2: the signal after batch 2 is in the middle of step 2.
    with pytest.raises(SystemExit):
        _accumulating(short_fit, tmp_path / "stopped", 4, callbacks=[_SigtermAt(2)])
    [ckpt] = (tmp_path / "stopped").glob("stopped-step=*.ckpt")
    assert ckpt.name == "stopped-step=2.ckpt"
    resumed, trainer = _accumulating(short_fit, tmp_path / "resumed", 4, ckpt_path=str(ckpt))
    straight, _ = _accumulating(short_fit, tmp_path / "straight", 4)
    assert trainer.global_step == 4
    assert torch.equal(resumed, straight)


def test_a_requeued_single_task_slurm_job_resumes_in_its_run_folder(short_fit, tmp_path,
                                                                     monkeypatch, capsys):
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "adi", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "runs"
    every_two = "--trainer.callbacks.every_n_train_steps=2"
    short_fit(root, NO_VAL, every_two, steps=2)
    run = root / "fit-slurm4242"
    assert [p.name for p in root.iterdir()] == [run.name]
    # Lightning's requeue handler saves hpc_ckpt_N.ckpt in the run folder (trainer.default_root_dir).
    first = torch.load(next(run.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    torch.save(first, run / "hpc_ckpt_1.ckpt")
    capsys.readouterr()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a requeued job
    short_fit(root, NO_VAL, every_two, steps=4)
    err = capsys.readouterr().err
    assert f"adi_lightning: SLURM restarted this job (1 time(s)): resuming from {run / 'hpc_ckpt_1.ckpt'}" in err
    assert [p.name for p in root.iterdir()] == [run.name]
    assert read_identifier(run / "identifier.safetensors")[1]["global_step"] == "4"


def test_ctrl_c_exits_1_naming_the_newest_checkpoint(short_fit, tmp_path, capsys, fail_fit_at,
                                                     monkeypatch):
    fail_fit_at(2, KeyboardInterrupt())
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # Lightning ignores SIGINT after a Ctrl+C
    with pytest.raises(SystemExit) as info:
        short_fit(tmp_path / "runs", NO_VAL, "--trainer.callbacks.every_n_train_steps=1", steps=4)
    assert info.value.code == 1
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("adi_lightning: stopped by")]
    assert line.startswith("adi_lightning: stopped by SIGINT at step 2; resume with: python -m adi_lightning fit "), line
    ckpt = Path(shlex.split(line)[-1])
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
