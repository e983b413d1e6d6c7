"""No command replaces or deletes files it did not create (folders it writes carry a marker), and toy
export "when missing" only ever writes into this project's own cache."""

from __future__ import annotations

import pytest

from adi_lightning.io import atomic_dir
from adi_lightning.paths import OWNER_MARKER, is_owned, toy_cache_dir


def user_photos(folder):
    folder.mkdir(parents=True)
    for name in ("IMG_0001.jpg", "IMG_0002.jpg"):
        (folder / name).write_bytes(b"not really a jpeg, but the user's")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_make_data_never_replaces_a_folder_it_did_not_write(tmp_path):
    from adi_lightning.toy.__main__ import main

    photos = tmp_path / "photos"
    before = user_photos(photos)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="was not written by adi_lightning") as err:
            main(["make-data", "--out", str(photos), "--num-exemplars", "2", *extra])
        assert "IMG_0001.jpg" in str(err.value) and "--overwrite" not in str(err.value)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_make_data_replaces_its_own_folder_only_when_asked(tmp_path):
    from adi_lightning.toy.__main__ import main

    out = tmp_path / "toy"
    main(["make-data", "--out", str(out), "--num-exemplars", "2"])
    assert is_owned(out)
    with pytest.raises(FileExistsError, match="already holds a toy folder") as err:
        main(["make-data", "--out", str(out), "--num-exemplars", "2"])
    assert "--overwrite" not in str(err.value)  # no message suggests the destructive flag
    main(["make-data", "--out", str(out), "--num-exemplars", "3", "--overwrite"])
    assert len([p for p in out.glob("*.png")]) == 3 * 2 + 6


def test_atomic_dir_refuses_an_unmarked_folder_before_building(tmp_path):
    """Every writer of whole folders (tiny builder, pretrain, partners, export) goes through here."""
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "model_index.json").write_text("{}")  # written by someone else
    built = []
    with pytest.raises(FileExistsError, match="never replaced"):
        with atomic_dir(target) as tmp:
            built.append(tmp)
    assert not built and (target / "model_index.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # no temp sibling left behind
    other = tmp_path / "ours"
    with atomic_dir(other, "test folder") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (other / OWNER_MARKER).is_file()
    with atomic_dir(other) as tmp:  # marked: may be replaced
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in other.iterdir()) == [OWNER_MARKER, "b.txt"]


@pytest.mark.e2e
def test_fit_on_a_user_folder_without_metadata_is_a_layout_error_not_an_export(tmp_path, capsys):
    """The newcomer's case: the quick-start config (export_toy_if_missing: true) pointed at photos."""
    from adi_lightning.cli import main

    photos = tmp_path / "photos"
    before = user_photos(photos)
    with pytest.raises(SystemExit) as exit_:
        main(args=["fit", "--config", "jump.yaml", f"--data.root={photos}", f"--trainer.default_root_dir={tmp_path / 'runs'}",
                   "--trainer.enable_progress_bar=false"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("adi_lightning: error:") and "metadata.jsonl" in err and "overwrite" not in err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_the_toy_folder_defaults_to_the_project_cache(toy_cache):
    from adi_lightning.data import ActionTripleDataModule

    dm = ActionTripleDataModule(action="kicking", export_toy_if_missing=True, toy_difficulty="diverse")
    assert dm.root == str(toy_cache / "toy" / "diverse" / "kicking") == str(toy_cache_dir("diverse", "kicking"))
    dm.prepare_data()
    assert is_owned(dm.root) and (toy_cache / "toy" / "diverse" / "kicking" / "metadata.jsonl").is_file()


def test_a_damaged_toy_cache_folder_is_exported_again(tmp_path, monkeypatch, capsys):
    """fit's toy folder in the project cache repairs itself: a missing image or a missing
    metadata.jsonl is exported again (atomically, said in one line), never 'choose another --out'."""
    from adi_lightning.data import ActionTripleDataModule, read_action_folder
    from adi_lightning.paths import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    dm = ActionTripleDataModule(action="waving", export_toy_if_missing=True, toy_difficulty="diverse")
    dm.prepare_data()
    root = toy_cache_dir("diverse", "waving")
    images = sorted(p.name for p in root.glob("*.png"))
    (root / images[0]).unlink()
    dm.prepare_data()
    assert f"the toy folder {root} is damaged (" in capsys.readouterr().err
    assert sorted(p.name for p in root.glob("*.png")) == images and is_owned(root)
    (root / "metadata.jsonl").unlink()
    dm.prepare_data()
    assert f"the toy folder {root} has no metadata.jsonl; exporting it again" in capsys.readouterr().err
    assert len(read_action_folder(root)) == len(images)
    assert [p.name for p in root.parent.iterdir()] == ["waving"]  # no temp folders left


def test_a_toy_cache_folder_it_did_not_write_is_refused_with_the_command_that_clears_it(tmp_path, monkeypatch):
    from adi_lightning.data import ActionTripleDataModule
    from adi_lightning.paths import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    root = toy_cache_dir("diverse", "waving")
    before = user_photos(root)
    dm = ActionTripleDataModule(action="waving", export_toy_if_missing=True, toy_difficulty="diverse")
    with pytest.raises(ValueError) as err:
        dm.prepare_data()
    assert f"move it away (mv {root} {root}.old) and run the command again" in str(err.value)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
