"""The troubleshooting table, run: each bad input gives one clear error and leaves no file
(a failure after training steps keeps its folder with the last good identifier and the logs).

Every case goes through the real CLI entry point; the README's troubleshooting table lists
the same rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adi_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def _copy_data(tiny_data: str, dest: Path) -> Path:
    shutil.copytree(tiny_data, dest)
    return dest


def _rewrite(folder: Path, edit) -> None:
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    meta.write_text("".join(line + "\n" for line in edit(rows)))


def _dumps(rows):
    return [json.dumps(r) for r in rows]


def missing_image(data: Path, tmp: Path):
    (data / "red_jumping.png").unlink()
    return {}, "red_jumping.png"


def corrupt_image(data: Path, tmp: Path):
    (data / "green_jumping.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return {}, "green_jumping.png"


def empty_folder(data: Path, tmp: Path):
    shutil.rmtree(data)
    data.mkdir()
    return {}, "metadata.jsonl"


def no_metadata(data: Path, tmp: Path):
    (data / "metadata.jsonl").unlink()
    return {}, "metadata.jsonl"


def bad_json_line(data: Path, tmp: Path):
    _rewrite(data, lambda rows: _dumps(rows[:1]) + ['{"file_name": "x.png", "action": '] + _dumps(rows[1:]))
    return {}, "metadata.jsonl:2"


def action_not_present(data: Path, tmp: Path):
    return {"data.action": "moonwalking"}, "moonwalking"


def anchor_without_partner(data: Path, tmp: Path):
    _rewrite(data, lambda rows: _dumps(r for r in rows if not (r["subject"] == "blue" and r["action"] != "jumping")))
    return {}, "blue_jumping.png"


def unknown_model_path(data: Path, tmp: Path):
    return {"model.pretrained_model_name_or_path": str(tmp / "no" / "such" / "pipeline")}, "model.pretrained_model_name_or_path"


def unknown_hub_id_offline(data: Path, tmp: Path):
    return {"model.pretrained_model_name_or_path": "nobody-here/no-such-model"}, "nobody-here/no-such-model"


def not_a_pipeline(data: Path, tmp: Path):
    folder = tmp / "not_a_pipeline"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"0")
    return {"model.pretrained_model_name_or_path": str(folder)}, "model_index.json"


def placeholder_in_vocab(data: Path, tmp: Path):
    return {"model.placeholder_token": "photo"}, "model.placeholder_token"


def multi_token_initializer(data: Path, tmp: Path):
    return {"model.initializer_token": "dogcat"}, "model.initializer_token"


def threshold_out_of_range(data: Path, tmp: Path):
    return {"model.mask_threshold": "0"}, "model.mask_threshold"


def identifier_mismatch(data: Path, tmp: Path):
    path = tmp / "sd2_identifier.safetensors"
    meta = {"format": "adi-lightning-identifier", "layer_paths": json.dumps([f"l{i}" for i in range(16)])}
    save_file({"identifier": torch.zeros(16, 1024), "layer_to_row": torch.arange(16)}, str(path), meta)
    return {"model.identifier_path": str(path), "subcommand": "predict"}, "sd2_identifier.safetensors"


def prompts_without_the_placeholder(data: Path, tmp: Path):
    return {"model.placeholder_token": "<jump>"}, "model.placeholder_token '<jump>'"


def pool_requested_without_a_pool(data: Path, tmp: Path):
    return {"data.context_partners": "pool"}, "context_partners='pool' but action 'jumping' has no context-pool image"


def training_on_the_context_pool(data: Path, tmp: Path):
    shutil.copy(data / "red_jumping.png", data / "pool_jumping.png")
    _rewrite(data, lambda rows: _dumps(rows + [{"file_name": "pool_jumping.png", "action": "jumping",
                                                "subject": "pool", "context_pool": True}]))
    return {"model.update_from": "anchor_and_context"}, "model.update_from='anchor_and_context' would train on context-pool images"


def placeholder_only_inside_other_words(data: Path, tmp: Path):
    # 'sks' is inside 'asks': not the placeholder (README "Prompts and the placeholder").
    return ({"model.placeholder_token": "sks", "data.validation_prompts": '["a photo of a person who asks"]'},
            "none of data.validation_prompts contains model.placeholder_token 'sks'")


def placeholder_joined_to_a_word(data: Path, tmp: Path):
    return ({"subcommand": "predict", "data.predict_prompts": '["a photo of a dog<A>"]'},
            "data.predict_prompts: 'a photo of a dog<A>' joins model.placeholder_token '<A>' to 'dog'")


LONG = "a photo of a person" + " and a dog" * 24  # 77 tokens: the placeholder after it is token 79 of 80


def template_pushes_placeholder_past_the_token_limit(data: Path, tmp: Path):
    return ({"data.prompt_templates": f'["{LONG} {{}}"]'},
            "data.prompt_templates: '" + LONG + " <A>' is 80 tokens long")


def validation_prompt_with_placeholder_past_the_token_limit(data: Path, tmp: Path):
    return ({"data.validation_prompts": f'["a photo of a dog <A>", "{LONG} <A>"]'},
            "the text encoder reads 77 tokens (tokenizer.model_max_length)")


def predict_prompt_with_placeholder_past_the_token_limit(data: Path, tmp: Path):
    return ({"subcommand": "predict", "data.predict_prompts": f'["{LONG} <A>"]'}, "is token 79 of 80")


def nan_loss_at_the_first_step(data: Path, tmp: Path):
    return {"nan_from_step": 0}, "non-finite training loss (nan) at global step 0"


def nan_loss_after_two_steps(data: Path, tmp: Path):
    # A failure after completed steps keeps the folder, with the last good identifier and the logs.
    return ({"nan_from_step": 2, "trainer.max_steps": 4, "trainer.log_every_n_steps": 1,
             "kept": ["identifier_last_good.safetensors", "metrics.csv"]},
            "non-finite training loss (nan) at global step 2")


def output_not_writable(data: Path, tmp: Path):
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return {"trainer.default_root_dir": str(blocker / "outputs")}, "trainer.default_root_dir"


CASES = [missing_image, corrupt_image, empty_folder, no_metadata, bad_json_line, action_not_present,
         anchor_without_partner, unknown_model_path, unknown_hub_id_offline, not_a_pipeline,
         placeholder_in_vocab, multi_token_initializer, threshold_out_of_range, identifier_mismatch,
         prompts_without_the_placeholder, pool_requested_without_a_pool, training_on_the_context_pool,
         placeholder_only_inside_other_words, placeholder_joined_to_a_word,
         template_pushes_placeholder_past_the_token_limit, validation_prompt_with_placeholder_past_the_token_limit,
         predict_prompt_with_placeholder_past_the_token_limit, nan_loss_at_the_first_step, nan_loss_after_two_steps,
         output_not_writable]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_clear_error_and_no_files(case, tiny_pipeline, tiny_data, tmp_path, capsys, fail_fit_at):
    data = _copy_data(tiny_data, tmp_path / "data")
    overrides, expected = case(data, tmp_path)
    subcommand = overrides.pop("subcommand", "fit")
    kept = overrides.pop("kept", [])
    if "nan_from_step" in overrides:
        fail_fit_at(overrides.pop("nan_from_step"))
    root = Path(overrides.pop("trainer.default_root_dir", tmp_path / "outputs"))
    args = [subcommand, "--config", str(REPO / "experiments" / "tiny.yaml"),
            f"--model.pretrained_model_name_or_path={tiny_pipeline}", f"--data.root={data}",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]
    args += [f"--{key}={value}" for key, value in overrides.items()]
    with pytest.raises(SystemExit) as exit_info:
        main(args=args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("adi_lightning: error:")]
    assert len(message) == 1, err[-2000:]
    assert expected in message[0]
    assert "Traceback" not in err
    leftovers = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    if not kept:
        assert leftovers == []
        assert "folder is kept" not in err
    else:  # a failure after training steps: one run folder, named on stderr, holding these results
        assert {p.name for p in leftovers} >= set(kept), leftovers
        [run] = {p.relative_to(root).parts[0] for p in leftovers}
        assert f"adi_lightning: the failed run's folder is kept: {root / run}" in err

