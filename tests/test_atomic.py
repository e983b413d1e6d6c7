"""Atomic outputs: an interrupted writer leaves the old file or the new one, never a torn one."""

import errno
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


def _write_checkpoint(value, target):
    from adi_lightning.checkpoint_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"state": torch.full((64,), float(value))}, target)


def _write_image(value, target):
    from PIL import Image

    from adi_lightning.io import atomic_save_image

    atomic_save_image(Image.new("RGB", (8, 8), (value, 0, 0)), target)


WRITERS = {
    "epoch=0-step=2.ckpt": _write_checkpoint,
    "identifier.safetensors": lambda v, t: atomic_save_safetensors({"identifier": torch.full((4, 8), float(v))}, t,
                                                                   {"format": "x"}),
    "grid.png": _write_image,
    "metrics.json": lambda v, t: __import__("adi_lightning.io").io.atomic_write_json(t, {"value": v}),
}


@pytest.mark.parametrize("name", WRITERS)
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_torn_file(name, tmp_path, disk_full):
    """ENOSPC while writing a checkpoint, an identifier, a grid or metrics: one line
    ``could not write <path>: <strerror>``, the earlier file intact, no temp file left."""
    target = tmp_path / name
    WRITERS[name](1, target)
    before = target.read_bytes()
    disk_full(f"*{target.suffix}*")
    with pytest.raises(OSError) as caught:
        WRITERS[name](2, target)
    assert str(caught.value) == f"could not write {target}: No space left on device"
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_failed_runs_folder_never_lists_a_temp_file(tmp_path):
    """A writer killed mid-write leaves its hidden temp file; it is not a result to keep."""
    from adi_lightning.callbacks import run_results

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".epoch=0-step=2.ckpt.k2j3h4.tmp").write_bytes(b"torn")
    (tmp_path / "config.yaml").write_text("{}")
    assert run_results(tmp_path) == []
