"""Run folders: a fresh one per command, one shared folder per multi-process launch."""

import pytest

from adi_lightning.cli import RUN_DIR_ENV, make_run_dir

LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID",
              "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", RUN_DIR_ENV)


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def test_each_command_gets_its_own_new_folder(tmp_path):
    first = make_run_dir(tmp_path, "fit")
    second = make_run_dir(tmp_path, "fit")
    assert first != second and first.is_dir() and second.is_dir()


def test_lightning_ddp_children_join_rank_zero_folder(tmp_path, monkeypatch):
    parent = make_run_dir(tmp_path, "fit")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert make_run_dir(tmp_path, "fit") == parent


@pytest.mark.parametrize("env", [
    {"TORCHELASTIC_RUN_ID": "job7", "WORLD_SIZE": "4"},
    {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0"},
])
def test_ranks_started_together_by_a_launcher_share_one_folder(tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    folders = set()
    for rank in range(3):  # each rank starts with a clean environment of its own
        monkeypatch.delenv(RUN_DIR_ENV, raising=False)
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        folders.add(make_run_dir(tmp_path, "fit"))
    assert len(folders) == 1 and next(iter(folders)).is_dir()


@pytest.mark.parametrize("env,name", [
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1234"}, "fit-slurm1234"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1240", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "6"},
     "fit-slurm1234_6"),
])
def test_a_single_task_slurm_job_names_its_folder_and_rejoins_it_only_when_requeued(tmp_path, monkeypatch, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    first = make_run_dir(tmp_path, "fit")
    assert first == tmp_path / name
    monkeypatch.delenv(RUN_DIR_ENV)
    second = make_run_dir(tmp_path, "fit")  # another command in the same job: a folder of its own
    assert second != first and second.is_dir()
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued the job
    assert make_run_dir(tmp_path, "fit") == first

