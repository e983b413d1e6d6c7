"""Atomic outputs: an interrupted writer leaves the old file or the new one, never a torn one."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from adi_lightning.io import atomic_path, atomic_save_safetensors, atomic_write_text

SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from adi_lightning.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "w") as handle:
            handle.write("new-" * 1000)
            handle.flush()
            print("half written", flush=True)
            time.sleep(60)
            handle.write("end")
    """
)


def test_killed_writer_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old content")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_text() == "old content"


def test_interrupted_write_cleans_up_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "identifier.safetensors"
    atomic_save_safetensors({"identifier": torch.zeros(2, 3)}, target, {"format": "x"})
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identifier.safetensors"]


def test_completed_write_replaces_the_file(tmp_path):
    target = tmp_path / "grid.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.json"]
