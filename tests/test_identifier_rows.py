"""benchmarks/identifier_rows.py: the per-row report and the row reset used to find where a leak sits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import identifier_rows  # noqa: E402


def _identifier(path: Path, pipeline: str) -> torch.Tensor:
    table = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    meta = {"format": "adi-lightning-identifier", "family": "sd", "initializer_token": "standing",
            "base_model": pipeline, "layer_paths": json.dumps([f"layer{i}.attn2" for i in range(16)])}
    save_file({"identifier": table, "layer_to_row": torch.arange(16)}, str(path), meta)
    return table


def test_reset_rows_sets_only_those_rows_to_the_initializer():
    table, init = torch.randn(4, 3), torch.ones(3)
    out = identifier_rows.reset_rows(table, [1, 3], init)
    assert torch.equal(out[[1, 3]], init.expand(2, 3)) and torch.equal(out[[0, 2]], table[[0, 2]])
    with pytest.raises(ValueError, match=r"--reset-rows \[4\]: the identifier has rows 0..3"):
        identifier_rows.reset_rows(table, [4], init)


def test_the_copy_holds_the_initializer_rows_and_an_existing_out_is_never_replaced(tiny_pipeline, tmp_path, capsys):
    table = _identifier(tmp_path / "id.safetensors", tiny_pipeline)
    out = tmp_path / "reset.safetensors"
    assert identifier_rows.main([str(tmp_path / "id.safetensors"), "--words", "man", "--reset-rows", "12",
                                 "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "layer12.attn2" in report and "standing" in report and "man" in report
    written = load_file(str(out))["identifier"]
    init = identifier_rows.word_embeddings(tiny_pipeline, ["standing"])["standing"]
    assert torch.equal(written[12], init) and torch.equal(written[:12], table[:12])
    before = out.read_bytes()
    assert identifier_rows.main([str(tmp_path / "id.safetensors"), "--reset-rows", "0", "--out", str(out)]) == 1
    assert "exists: this script never writes over a file" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_remove_words_leaves_no_change_along_the_words_and_one_edit_per_copy(tiny_pipeline, tmp_path, capsys):
    table = _identifier(tmp_path / "id.safetensors", tiny_pipeline)
    out = tmp_path / "nowords.safetensors"
    assert identifier_rows.main([str(tmp_path / "id.safetensors"), "--words", "man", "--remove-words", "man", "cat",
                                 "--out", str(out)]) == 0
    words = identifier_rows.word_embeddings(tiny_pipeline, ["standing", "man", "cat"])
    change = load_file(str(out))["identifier"] - words["standing"]
    assert (change @ words["man"]).abs().max() < 1e-5 and (change @ words["cat"]).abs().max() < 1e-5
    assert not torch.allclose(change, table - words["standing"])
    assert identifier_rows.main([str(tmp_path / "id.safetensors"), "--remove-words", "man", "--reset-rows", "1",
                                 "--out", str(tmp_path / "both.safetensors")]) == 1
    assert "one edit per copy" in capsys.readouterr().err and not (tmp_path / "both.safetensors").exists()
