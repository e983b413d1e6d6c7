"""The troubleshooting table, run: each bad input gives one clear error and leaves no file
(a failure after training steps keeps its folder with the last good identifier and the logs);
each odd but valid input (HANDLED) runs, and what it loads is checked.

Every case goes through the real CLI entry point. A case's docstring is the first cell of its
row in the troubleshooting table (docs/troubleshooting.md) (several cases may share a row); a test keeps the
table and the cases one to one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from adi_lightning.cli import main
from adi_lightning.data import read_action_folder
from adi_lightning.data.layout import open_rgb
from adi_lightning.data.triples import load_image
from adi_lightning.export import main as export_main
from adi_lightning.identifier import LayerwiseIdentifier

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)

REPO = Path(__file__).resolve().parents[1]


def _copy_data(tiny_data: str, dest: Path) -> Path:
    shutil.copytree(tiny_data, dest)
    return dest


def _rewrite(folder: Path, edit) -> None:
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    meta.write_text("".join(line + "\n" for line in edit(rows)))


def _rename(folder: Path, old: str, new: str) -> None:
    """Point the metadata line of ``old`` at ``new`` (the image file is the caller's)."""
    (folder / old).unlink()
    _rewrite(folder, lambda rows: _dumps({**r, "file_name": new} if r["file_name"] == old else r for r in rows))


def _dumps(rows):
    return [json.dumps(r) for r in rows]


def missing_image(data: Path, tmp: Path):
    """missing image"""
    (data / "red_jumping.png").unlink()
    return {}, "red_jumping.png"


def corrupt_image(data: Path, tmp: Path):
    """corrupt image"""
    (data / "green_jumping.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return {}, "green_jumping.png"


def empty_folder(data: Path, tmp: Path):
    """empty folder, or no `metadata.jsonl`"""
    shutil.rmtree(data)
    data.mkdir()
    return {}, "metadata.jsonl"


def no_metadata(data: Path, tmp: Path):
    """empty folder, or no `metadata.jsonl`"""
    (data / "metadata.jsonl").unlink()
    return {}, "metadata.jsonl"


def bad_json_line(data: Path, tmp: Path):
    """malformed JSON line"""
    _rewrite(data, lambda rows: _dumps(rows[:1]) + ['{"file_name": "x.png", "action": '] + _dumps(rows[1:]))
    return {}, "metadata.jsonl:2"


def action_not_present(data: Path, tmp: Path):
    """action not present"""
    return {"data.action": "moonwalking"}, "moonwalking"


def anchor_without_partner(data: Path, tmp: Path):
    """anchor without an action-different partner"""
    _rewrite(data, lambda rows: _dumps(r for r in rows if not (r["subject"] == "blue" and r["action"] != "jumping")))
    return {}, "blue_jumping.png"


def unknown_model_path(data: Path, tmp: Path):
    """unknown model path"""
    return {"model.pretrained_model_name_or_path": str(tmp / "no" / "such" / "pipeline")}, "model.pretrained_model_name_or_path"


def unknown_hub_id_offline(data: Path, tmp: Path):
    """unknown hub id while offline"""
    return {"model.pretrained_model_name_or_path": "nobody-here/no-such-model"}, "nobody-here/no-such-model"


def not_a_pipeline(data: Path, tmp: Path):
    """a folder that is not a diffusers pipeline"""
    folder = tmp / "not_a_pipeline"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"0")
    return {"model.pretrained_model_name_or_path": str(folder)}, "model_index.json"


def placeholder_in_vocab(data: Path, tmp: Path):
    """placeholder token already in the vocabulary"""
    return {"model.placeholder_token": "photo"}, "model.placeholder_token"


def multi_token_initializer(data: Path, tmp: Path):
    """initializer word of several tokens"""
    return {"model.initializer_token": "dogcat"}, "model.initializer_token"


def multi_token_subject_word(data: Path, tmp: Path):
    """subject word of several tokens"""
    return {"model.subject_words": "[person, dogcat]"}, "model.subject_words 'dogcat' must be a single token"


def subject_word_that_is_evaluated(data: Path, tmp: Path):
    """subject word that is also an evaluated subject (`data.eval_subjects`)"""
    return ({"model.subject_words": "[person, dog]", "data.eval_subjects": "[cat, dog]"},
            "model.subject_words ['dog'] are also data.eval_subjects")


def threshold_out_of_range(data: Path, tmp: Path):
    """`mask_threshold` outside [0, 1]"""
    return {"model.mask_threshold": "1.5"}, "model.mask_threshold must be in [0, 1]"


def identifier_mismatch(data: Path, tmp: Path):
    """identifier from another base model: its text width D differs (`predict`)"""
    path = tmp / "sd2_identifier.safetensors"
    meta = {"format": "adi-lightning-identifier", "layer_paths": json.dumps([f"l{i}" for i in range(16)]),
            "base_model": "stabilityai/stable-diffusion-2-1"}
    save_file({"identifier": torch.zeros(16, 1024), "layer_to_row": torch.arange(16)}, str(path), meta)
    return ({"model.identifier_path": str(path), "subcommand": "predict"},
            "sd2_identifier.safetensors (base model 'stabilityai/stable-diffusion-2-1') has D=1024")


def prompts_without_the_placeholder(data: Path, tmp: Path):
    """generation prompts that do not spell the placeholder (e.g. `<A>` with `model.placeholder_token=<jump>`)"""
    return {"model.placeholder_token": "<jump>"}, "model.placeholder_token '<jump>'"


def pool_requested_without_a_pool(data: Path, tmp: Path):
    """`data.context_partners=pool` on a folder without a context pool"""
    return {"data.context_partners": "pool"}, "context_partners='pool' but action 'jumping' has no context-pool image"


def training_on_the_context_pool(data: Path, tmp: Path):
    """`model.update_from=anchor_and_context` with a context pool"""
    shutil.copy(data / "red_jumping.png", data / "pool_jumping.png")
    _rewrite(data, lambda rows: _dumps(rows + [{"file_name": "pool_jumping.png", "action": "jumping",
                                                "subject": "pool", "context_pool": True}]))
    return {"model.update_from": "anchor_and_context"}, "model.update_from='anchor_and_context' would train on context-pool images"


def placeholder_only_inside_other_words(data: Path, tmp: Path):
    """the placeholder only inside another word (`model.placeholder_token=sks`, the only validation prompt "a photo of a person who asks")"""
    # 'sks' is inside 'asks': not the placeholder (docs/cli.md "Prompts and the placeholder").
    return ({"model.placeholder_token": "sks", "data.validation_prompts": '["a photo of a person who asks"]'},
            "none of data.validation_prompts contains model.placeholder_token 'sks'")


def placeholder_joined_to_a_word(data: Path, tmp: Path):
    """a placeholder joined to a word"""
    return ({"subcommand": "predict", "data.predict_prompts": '["a photo of a dog<A>"]'},
            "data.predict_prompts: 'a photo of a dog<A>' joins model.placeholder_token '<A>' to 'dog'")


LONG = "a photo of a person" + " and a dog" * 24  # 77 tokens: the placeholder after it is token 79 of 80


def template_pushes_placeholder_past_the_token_limit(data: Path, tmp: Path):
    """a template, evaluation, validation or predict prompt whose placeholder falls past the token limit"""
    return ({"data.prompt_templates": f'["{LONG} {{}}"]'},
            "data.prompt_templates: '" + LONG + " <A>' is 80 tokens long")


def validation_prompt_with_placeholder_past_the_token_limit(data: Path, tmp: Path):
    """a template, evaluation, validation or predict prompt whose placeholder falls past the token limit"""
    return ({"data.validation_prompts": f'["a photo of a dog <A>", "{LONG} <A>"]'},
            "the text encoder reads 77 tokens (tokenizer.model_max_length)")


def predict_prompt_with_placeholder_past_the_token_limit(data: Path, tmp: Path):
    """a template, evaluation, validation or predict prompt whose placeholder falls past the token limit"""
    return ({"subcommand": "predict", "data.predict_prompts": f'["{LONG} <A>"]'}, "is token 79 of 80")


def nan_loss_at_the_first_step(data: Path, tmp: Path):
    """NaN or inf loss at the first training step (global step 0)"""
    return {"nan_from_step": 0}, "non-finite training loss (nan) at global step 0"


def nan_loss_after_two_steps(data: Path, tmp: Path):
    """NaN or inf loss at global step N >= 2, or another exception there"""
    # A failure after completed steps keeps the folder, with the last good identifier and the logs.
    return ({"nan_from_step": 2, "trainer.max_steps": 4, "trainer.log_every_n_steps": 1,
             "kept": ["identifier_last_good.safetensors", "metrics.csv"]},
            "non-finite training loss (nan) at global step 2")


def output_not_writable(data: Path, tmp: Path):
    """output directory not writable"""
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return {"trainer.default_root_dir": str(blocker / "outputs")}, "trainer.default_root_dir"




def float_image(data: Path, tmp: Path):
    """an image mode with no agreed range (a 32-bit float TIFF, mode `F`)"""
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(data / "red_jumping.tiff")
    _rename(data, "red_jumping.png", "red_jumping.tiff")
    return {}, "metadata.jsonl:1: image 'red_jumping.tiff' has mode 'F'"


def metadata_not_utf8(data: Path, tmp: Path):
    """`metadata.jsonl` that is not UTF-8 (saved as Latin-1)"""
    _rewrite(data, lambda rows: _dumps(rows[:2]) + [json.dumps({**rows[2], "caption": "café"}, ensure_ascii=False)]
             + _dumps(rows[3:]))
    meta = data / "metadata.jsonl"
    meta.write_bytes(meta.read_text(encoding="utf-8").encode("latin-1"))
    return {}, "metadata.jsonl:3: not UTF-8 text"


def duplicate_file_name(data: Path, tmp: Path):
    """the same `file_name` on two metadata lines"""
    _rewrite(data, lambda rows: _dumps(rows + [{**rows[0], "action": "waving"}]))
    return {}, "metadata.jsonl:13: duplicate file_name 'red_jumping.png' (first listed at"


def file_name_outside_the_folder(data: Path, tmp: Path):
    """a `file_name` outside the folder (`../x.png`, or an absolute path)"""
    _rewrite(data, lambda rows: _dumps([{**rows[0], "file_name": "../red_jumping.png"}] + rows[1:]))
    return {}, "metadata.jsonl:1: file_name '../red_jumping.png' must be a relative path inside the folder"


def metadata_line_without_a_required_key(data: Path, tmp: Path):
    """a metadata line without `file_name`, `action` or `subject`"""
    _rewrite(data, lambda rows: _dumps(rows[:1] + [{k: v for k, v in rows[1].items() if k != "subject"}] + rows[2:]))
    return {}, "metadata.jsonl:2: missing required key 'subject'"


def data_root_is_a_file(data: Path, tmp: Path):
    """`data.root` that is a file, or does not exist"""
    return {"data.root": str(data / "metadata.jsonl")}, "metadata.jsonl is not a directory"


def config_does_not_exist(data: Path, tmp: Path):
    """a `--config` file that does not exist"""
    return {"config": str(tmp / "jmup.yaml")}, "jmup.yaml: no such file, and no experiment of that name; available:"


def config_is_not_text(data: Path, tmp: Path):
    """a `--config` file that is not text (binary junk)"""
    (tmp / "junk.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    return {"config": str(tmp / "junk.yaml")}, "junk.yaml: not a YAML config: not UTF-8 text"


def config_with_a_yaml_syntax_error(data: Path, tmp: Path):
    """a `--config` file with a YAML syntax error"""
    text = (REPO / "experiments" / "tiny.yaml").read_text().replace("  learning_rate: 0.005", "  learning_rate: [0.005")
    (tmp / "broken.yaml").write_text(text)
    line = text.splitlines().index("  learning_rate: [0.005") + 1
    return {"config": str(tmp / "broken.yaml")}, f"broken.yaml, line {line + 1}"


def config_copied_out_of_the_project(data: Path, tmp: Path):
    """a copy of a project experiment in another folder (its group files are relative to it)"""
    text = (REPO / "experiments" / "tiny.yaml").read_text()
    (tmp / "mine.yaml").write_text(text)
    line = text.splitlines().index("trainer: ../configs/trainer/cpu.yaml") + 1
    return ({"config": str(tmp / "mine.yaml")},
            f"mine.yaml, line {line}: trainer: '../configs/trainer/cpu.yaml' not found (a path inside a config file "
            f"is relative to that file's folder: {tmp.resolve().parent / 'configs' / 'trainer' / 'cpu.yaml'}); to build on a "
            "project experiment from anywhere, layer a file holding only your changes over it: --config jump.yaml "
            "--config mine.yaml")


def identifier_for_other_layers(data: Path, tmp: Path):
    """identifier from another base model: other cross-attention layers (`predict`)"""
    # the 10 attn2 layers of a UNet with layers_per_block=1 (the tiny pipeline has 2: 16 layers)
    blocks = [f"down_blocks.{b}.attentions.0" for b in range(3)] + ["mid_block.attentions.0"]
    blocks += [f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in range(2)]
    paths = [f"{block}.transformer_blocks.0.attn2" for block in blocks]
    path = tmp / "other_unet.safetensors"
    LayerwiseIdentifier(torch.zeros(32), paths).save(path, {"base_model": "org/other-tiny"})
    return ({"model.identifier_path": str(path), "subcommand": "predict"},
            "other_unet.safetensors (base model 'org/other-tiny') was learned for 10 cross-attention layers")


def identifier_path_not_an_identifier(data: Path, tmp: Path):
    """a file that is not an adi-lightning identifier (a diffusers textual-inversion file, say) as `model.identifier_path`"""
    path = tmp / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.zeros(1, 32)}, str(path))
    return ({"model.identifier_path": str(path), "subcommand": "predict"},
            "learned_embeds.safetensors is not an adi-lightning identifier file")


def none_for_a_key_that_cannot_be_null(data: Path, tmp: Path):
    """a sweep value `None` for a key that cannot be null (`--model.learning_rate=None`)"""
    return {"model.learning_rate": "None"}, 'Parser key "model.learning_rate"'


def learning_rate_not_positive(data: Path, tmp: Path):
    """`model.learning_rate` <= 0"""
    return {"model.learning_rate": "-0.01"}, "model.learning_rate must be > 0, got -0.01"


def starts_that_use_up_the_steps(data: Path, tmp: Path):
    """`model.starts` x `model.start_steps` that use up `trainer.max_steps`"""
    return ({"model.starts": 2, "model.start_steps": 1},
            "model.starts=2 x model.start_steps=1 = 2 steps of starts leave none of the run's 2 steps (trainer.max_steps)")


def unknown_mask_statistic(data: Path, tmp: Path):
    """an unknown `model.mask_statistic`"""
    return {"model.mask_statistic": "median"}, "model.mask_statistic"


def empty_predict_prompts(data: Path, tmp: Path):
    """empty `data.predict_prompts` or `data.predict_seeds` (`predict`)"""
    return {"subcommand": "predict", "data.predict_prompts": "[]"}, "data.predict_prompts is empty"


def misspelt_key(data: Path, tmp: Path):
    """a misspelt key (`--model.mask_treshold=0.5`)"""
    return ({"model.mask_treshold": "0.5"},
            "unknown key 'model.mask_treshold' on the command line; did you mean model.mask_threshold")


def disk_full_while_writing_a_checkpoint(data: Path, tmp: Path):
    """a full disk or failing filesystem while writing a checkpoint, the identifier, a grid or metrics"""
    # The checkpoint's write fails half way (conftest.disk_full); the folder keeps the last good
    # identifier and the logs, and no torn checkpoint.
    return ({"disk_full": "*.ckpt*", "trainer.log_every_n_steps": 1,
             "kept": ["identifier_last_good.safetensors", "metrics.csv"], "absent": ".ckpt"},
            re.compile(r"could not write \S+/checkpoints/\S+\.ckpt: No space left on device$"))


def misspelt_key_in_a_group_file_on_the_command_line(data: Path, tmp: Path):
    """a misspelt key in a group file typed on the command line (`--model my_model.yaml`)"""
    (tmp / "my_model.yaml").write_text("layerwise: true\nmask_treshold: 0.5\n")
    return ({"model": str(tmp / "my_model.yaml")},
            f"unknown key 'model.mask_treshold' in {tmp / 'my_model.yaml'}, line 2; did you mean model.mask_threshold")


def dangling_symbolic_link(data: Path, tmp: Path):
    """an image that is a symbolic link to a file that does not exist"""
    (data / "red_jumping.png").unlink()
    (data / "red_jumping.png").symlink_to(tmp / "elsewhere" / "red_jumping.png")
    return {}, f"red_jumping.png is a symbolic link to {tmp / 'elsewhere' / 'red_jumping.png'}, which does not exist"


def toy_cache_folder_not_written_by_adi_lightning(data: Path, tmp: Path):
    """a folder in the toy cache that adi_lightning did not write, where `fit` would export a toy folder"""
    from adi_lightning.paths import cache_dir

    root = cache_dir() / "toy" / "shared" / f"not-ours-{tmp.name}"
    root.mkdir(parents=True)
    (root / "IMG_0001.jpg").write_bytes(b"the user's")
    return ({"data.root": str(root), "data.export_toy_if_missing": "true"},
            f"adi_lightning did not write it, so it is never replaced; move it away (mv {root} {root}.old) and run "
            "the command again")


def _identifier(tmp: Path, rows: int = 16) -> Path:
    """A small adi-lightning identifier file (16 layers, D=32; ``rows``: 16, one per layer, or 1 shared) for
    the export cases."""
    path = tmp / "identifier.safetensors"
    meta = {"format": "adi-lightning-identifier", "layer_paths": json.dumps([f"l{i}" for i in range(16)])}
    save_file({"identifier": torch.randn(rows, 32), "layer_to_row": torch.arange(16) % rows}, str(path), meta)
    return path


def export_onto_an_existing_file(data: Path, tmp: Path):
    """`python -m adi_lightning.export --out` a file that exists and was not written by the export (`--overwrite` or not)"""
    mine = tmp / "my_embedding.safetensors"
    save_file({"emb": torch.ones(1, 32)}, str(mine))
    return ({"export": ["--identifier", str(_identifier(tmp)), "--out", str(mine), "--overwrite"]},
            f"--out {mine} already exists and was not written by adi_lightning.export")


def export_onto_its_own_identifier(data: Path, tmp: Path):
    """`python -m adi_lightning.export --out` the identifier being exported (`--overwrite` or not)"""
    identifier = _identifier(tmp)
    return ({"export": ["--identifier", str(identifier), "--out", str(identifier), "--overwrite"]},
            f"--out {identifier} is the identifier being exported")


def export_distillation_flags_for_a_one_row_identifier(data: Path, tmp: Path):
    """`python -m adi_lightning.export` of a one-row identifier with a measurement flag or `--lossy` typed"""
    identifier = _identifier(tmp, rows=1)
    return ({"export": ["--identifier", str(identifier), "--out", str(tmp / "ti.safetensors"), "--steps", "50",
                        "--subjects", "dog"]},
            f"--steps, --subjects: the identifier {identifier} has one row, nothing to distill or measure")


def ckpt_path_last(data: Path, tmp: Path):
    """`--ckpt_path last` (or `best`, `hpc`): every command gets a new run folder, which holds no checkpoint"""
    return {"ckpt_path": "last"}, "--ckpt_path last is ambiguous here: this command's run folder"


def ckpt_path_folder_without_a_checkpoint(data: Path, tmp: Path):
    """`--ckpt_path` a folder without a checkpoint (`*.ckpt`) in it"""
    folder = tmp / "not_a_run"
    folder.mkdir()
    (folder / "notes.txt").write_text("no checkpoint here")
    return {"ckpt_path": str(folder)}, f"ckpt_path='{folder}' is a folder without a checkpoint (*.ckpt) in it"


def abbreviated_key(data: Path, tmp: Path):
    """an abbreviated key (`--trainer.max_step=10`; argparse would take it as `max_steps`)"""
    return ({"trainer.max_step": "3"},
            "unknown key 'trainer.max_step' on the command line; did you mean trainer.max_steps")


def resume_at_max_steps(data: Path, tmp: Path):
    """`fit --ckpt_path` from a checkpoint already at `trainer.max_steps`"""
    # the harness first fits 2 steps (its last.ckpt is at step 2), then resumes with max_steps=2
    return ({"resume_after": 2},
            "is at global step 2 and trainer.max_steps=2: fit would train nothing; give --trainer.max_steps larger than 2")


def optimizer_on_the_command_line(data: Path, tmp: Path):
    """`--optimizer SGD` or `--lr_scheduler ...` (LightningCLI's optimizer keys)"""
    return ({"optimizer": "SGD"}, "unknown key 'optimizer' on the command line: the optimizer is AdamW on the identifier, "
                                  "configured by --model.learning_rate and --model.weight_decay")


def predict_without_an_identifier(data: Path, tmp: Path):
    """`validate`, `test` or `predict` without `model.identifier_path` or `--ckpt_path`"""
    return {"subcommand": "predict"}, "predict has no identifier to use: give --model.identifier_path="


def validate_without_an_identifier(data: Path, tmp: Path):
    """`validate`, `test` or `predict` without `model.identifier_path` or `--ckpt_path`"""
    return {"subcommand": "validate"}, "--model.identifier_path=untrained to validate with the untrained identifier"


def one_subject_in_one_context(data: Path, tmp: Path):
    """a folder whose images are all one subject in one context (no context pool), with the context test on"""
    _rewrite(data, lambda rows: _dumps({**r, "subject": "me", "context": "room"} for r in rows))
    return {}, "every context-different partner of anchor 'red_jumping.png' shares its subject='me' and context='room'"


def threshold_zero_under_a_quantile_statistic(data: Path, tmp: Path):
    """`mask_threshold` 0 under a quantile statistic (`absolute`, `relative`)"""
    return ({"model.mask_statistic": "relative", "model.mask_threshold": "0"},
            "model.mask_threshold=0 under model.mask_statistic=relative would keep no channel")


def or_under_change_basis(data: Path, tmp: Path):
    """`mask_combine: or` under `mask_statistic: change_basis`"""
    return ({"model.mask_statistic": "change_basis", "model.mask_combine": "or"},
            "model.mask_combine=or under model.mask_statistic=change_basis keeps every axis of the basis (P+)")


def masking_key_typed_with_masking_off(data: Path, tmp: Path):
    """a masking key typed with masking off (`--model.mask_threshold=1.0 --model.mask_combine=or`)"""
    return ({"model.mask_threshold": "1.0", "model.mask_combine": "or"},
            "--model.mask_combine=or has no effect: model.mask_threshold=1.0 turns masking off")


def start_steps_typed_without_multi_start(data: Path, tmp: Path):
    """`--model.start_steps` typed with `model.starts: 1`"""
    return {"model.start_steps": "5"}, "--model.start_steps=5 has no effect: model.starts=1 (multi-start off)"


def large_t_min_typed_without_a_large_t_phase(data: Path, tmp: Path):
    """`--model.large_t_min` typed with `model.large_t_steps: 0` and `model.starts: 1`"""
    return {"model.large_t_min": "0.5"}, "--model.large_t_min=0.5 has no effect: model.large_t_steps=0 and model.starts=1"


def generate_key_typed_without_generated_partners(data: Path, tmp: Path):
    """a `--data.generate_*` key typed without `data.action_different: generate`"""
    return ({"data.generate_steps": "5"},
            "--data.generate_steps=5 has no effect: data.action_different=require generates no partners")



def toy_difficulty_typed_with_a_folder_of_ones_own(data: Path, tmp: Path):
    """`--data.toy_difficulty` typed with `data.root` a folder outside the project's cache"""
    return ({"data.toy_difficulty": "diverse"},
            f"--data.toy_difficulty=diverse has no effect: data.root={data} lies outside the project's cache, "
            "the only place toy folders are exported to")


CASES = [missing_image, corrupt_image, empty_folder, no_metadata, bad_json_line, action_not_present,
         anchor_without_partner, unknown_model_path, unknown_hub_id_offline, not_a_pipeline,
         placeholder_in_vocab, multi_token_initializer, multi_token_subject_word, subject_word_that_is_evaluated,
         threshold_out_of_range, identifier_mismatch,
         prompts_without_the_placeholder, pool_requested_without_a_pool, training_on_the_context_pool,
         placeholder_only_inside_other_words, placeholder_joined_to_a_word,
         template_pushes_placeholder_past_the_token_limit, validation_prompt_with_placeholder_past_the_token_limit,
         predict_prompt_with_placeholder_past_the_token_limit, nan_loss_at_the_first_step, nan_loss_after_two_steps,
         output_not_writable, float_image, metadata_not_utf8, duplicate_file_name, file_name_outside_the_folder,
         metadata_line_without_a_required_key, data_root_is_a_file, config_does_not_exist, config_is_not_text,
         config_with_a_yaml_syntax_error, config_copied_out_of_the_project, identifier_for_other_layers,
         identifier_path_not_an_identifier,
         none_for_a_key_that_cannot_be_null, learning_rate_not_positive, starts_that_use_up_the_steps,
         unknown_mask_statistic,
         empty_predict_prompts, misspelt_key, disk_full_while_writing_a_checkpoint,
         misspelt_key_in_a_group_file_on_the_command_line, dangling_symbolic_link,
         toy_cache_folder_not_written_by_adi_lightning, export_onto_an_existing_file,
         export_onto_its_own_identifier, export_distillation_flags_for_a_one_row_identifier, ckpt_path_last,
         ckpt_path_folder_without_a_checkpoint,
         abbreviated_key, resume_at_max_steps, optimizer_on_the_command_line,
         predict_without_an_identifier, validate_without_an_identifier, one_subject_in_one_context,
         threshold_zero_under_a_quantile_statistic,
         or_under_change_basis,
         masking_key_typed_with_masking_off, start_steps_typed_without_multi_start,
         large_t_min_typed_without_a_large_t_phase, generate_key_typed_without_generated_partners,
         toy_difficulty_typed_with_a_folder_of_ones_own]


# ------------------------------------------------------------------ handled: odd but valid inputs
def _pixels(t: torch.Tensor) -> list[float]:
    """Per-channel mean of a loaded [3, H, W] tensor, in 0..255."""
    return [round(float(v), 1) for v in ((t + 1) * 127.5).mean((1, 2))]


def images_of_several_sizes_and_modes(data: Path, tmp: Path):
    """images of several sizes and modes: RGBA, grayscale (`L`), palette (`P`), 16-bit PNG (`I;16`)"""
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[:, :24] = (255, 0, 0, 255)  # left half opaque red; the right half transparent black
    Image.fromarray(rgba, "RGBA").save(data / "red_jumping.png")
    Image.fromarray(np.full((48, 64), 200, np.uint8), "L").save(data / "green_jumping.png")
    Image.fromarray(np.full((40, 32), 128 * 257, np.uint16)).save(data / "blue_jumping.png")  # mid grey, 16 bits
    palette = Image.fromarray(np.full((24, 40, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(data / "red_standing.png")

    def check(run: Path) -> None:
        loaded = {name: load_image(data / name, 32) for name in
                  ("red_jumping.png", "green_jumping.png", "blue_jumping.png", "red_standing.png")}
        assert {tuple(t.shape) for t in loaded.values()} == {(3, 32, 32)}
        rgba = loaded["red_jumping.png"]
        assert _pixels(rgba[:, :, :12]) == [255.0, 0.0, 0.0] and _pixels(rgba[:, :, -12:]) == [255.0] * 3  # on white
        assert _pixels(loaded["green_jumping.png"]) == [200.0] * 3
        assert _pixels(loaded["blue_jumping.png"]) == [128.0] * 3  # scaled from 16 bits, not clipped to white
        assert _pixels(loaded["red_standing.png"]) == [10.0, 200.0, 30.0]

    return {}, check


def exif_rotated_jpeg(data: Path, tmp: Path):
    """a JPEG rotated by its EXIF orientation (as phones save portraits)"""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # stored on its side: white on the left is white at the top when upright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(data / "yellow_jumping.jpg", exif=exif.tobytes(), quality=95)
    _rename(data, "yellow_jumping.png", "yellow_jumping.jpg")

    def check(run: Path) -> None:
        assert open_rgb(data / "yellow_jumping.jpg").size == (32, 64)  # upright: portrait
        upright = load_image(data / "yellow_jumping.jpg", 32)
        assert min(_pixels(upright[:, :12])) > 245 and max(_pixels(upright[:, -12:])) < 10  # white on top

    return {}, check


def metadata_with_bom_and_crlf(data: Path, tmp: Path):
    """`metadata.jsonl` with a UTF-8 BOM and CRLF line ends (as Windows editors save it)"""
    meta = data / "metadata.jsonl"
    names = [json.loads(line)["file_name"] for line in meta.read_text().splitlines()]
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_text().replace("\n", "\r\n").encode())

    def check(run: Path) -> None:
        assert [r.file_name for r in read_action_folder(data)] == names

    return {}, check


def sweep_value_none(data: Path, tmp: Path):
    """a sweep value `None` (wandb's `${args}` writes a null as `--model.identifier_path=None`)"""

    def check(run: Path) -> None:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["identifier_path"] is None and config["data"]["test_seeds"] is None

    # in fit: validate, test and predict refuse a null identifier (predict_without_an_identifier)
    return {"model.identifier_path": "None", "data.test_seeds": "None"}, check


def image_linked_from_outside_the_folder(data: Path, tmp: Path):
    """an image that is a symbolic link to a file outside the data folder"""
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    shutil.move(data / "red_jumping.png", elsewhere / "red_jumping.png")
    (data / "red_jumping.png").symlink_to(elsewhere / "red_jumping.png")
    expected = load_image(elsewhere / "red_jumping.png", 32)

    def check(run: Path) -> None:
        [record] = [r for r in read_action_folder(data) if r.file_name == "red_jumping.png"]
        assert torch.equal(load_image(record.path, 32), expected)  # read where the link points
        assert (run / "identifier.safetensors").is_file()

    return {}, check


def untrained_identifier_on_purpose(data: Path, tmp: Path):
    """`--model.identifier_path=untrained` (`validate`, `test`, `predict`)"""

    def check(run: Path) -> None:
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["identifier_path"] == "untrained"
        assert list((run / "images" / "predict").glob("*.png"))

    return {"subcommand": "predict", "model.identifier_path": "untrained"}, check


HANDLED = [images_of_several_sizes_and_modes, exif_rotated_jpeg, metadata_with_bom_and_crlf, sweep_value_none,
           image_linked_from_outside_the_folder, untrained_identifier_on_purpose]


# ------------------------------------------------------------------ the runs
def _user_files(tmp: Path, root: Path) -> dict[str, bytes]:
    """Every file under ``tmp`` outside the output root: the user's inputs, which no command may change."""
    return {str(p): p.read_bytes() for p in tmp.rglob("*") if p.is_file() and root not in p.parents}


def _run(case, tiny_pipeline, tiny_data, tmp_path, fail_fit_at, disk_full=None):
    """Prepare ``case``'s input, run it through the CLI; returns (expected, root, kept, absent, exit code)."""
    data = _copy_data(tiny_data, tmp_path / "data")
    overrides, expected = case(data, tmp_path)
    if "export" in overrides:  # python -m adi_lightning.export: its own arguments, no run folder
        before = _user_files(tmp_path, tmp_path / "outputs")
        code = export_main(overrides["export"])
        assert _user_files(tmp_path, tmp_path / "outputs") == before
        return expected, tmp_path / "outputs", [], None, code
    subcommand = overrides.pop("subcommand", "fit")
    config = overrides.pop("config", str(REPO / "experiments" / "tiny.yaml"))
    kept, absent = overrides.pop("kept", []), overrides.pop("absent", None)
    if "disk_full" in overrides:
        disk_full(overrides.pop("disk_full"))
    if "nan_from_step" in overrides:
        fail_fit_at(overrides.pop("nan_from_step"))
    root = Path(overrides.pop("trainer.default_root_dir", tmp_path / "outputs"))
    first_steps = overrides.pop("resume_after", None)
    overrides = {"data.root": str(data), **overrides}

    def command(sub: str, out: Path, steps: int) -> list[str]:
        return [sub, "--config", config, f"--model.pretrained_model_name_or_path={tiny_pipeline}",
                f"--trainer.default_root_dir={out}", f"--trainer.max_steps={steps}",
                "--trainer.enable_progress_bar=false", *(f"--{key}={value}" for key, value in overrides.items())]

    args = command(subcommand, root, 2)
    if first_steps is not None:  # a first fit (outside the output root), resumed from its last.ckpt
        main(args=command("fit", tmp_path / "first", first_steps))
        (last,) = (tmp_path / "first").rglob("last.ckpt")
        args.append(f"--ckpt_path={last}")
    before = _user_files(tmp_path, root)
    try:
        main(args=args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    assert _user_files(tmp_path, root) == before  # the user's files untouched
    return expected, root, kept, absent, code


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_clear_error_and_no_files(case, tiny_pipeline, tiny_data, tmp_path, capsys, fail_fit_at,
                                                      disk_full):
    expected, root, kept, absent, code = _run(case, tiny_pipeline, tiny_data, tmp_path, fail_fit_at, disk_full)
    assert code == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("adi_lightning: error:")]
    assert len(message) == 1, err[-2000:]
    assert expected.search(message[0]) if isinstance(expected, re.Pattern) else expected in message[0], message[0]
    assert "Traceback" not in err
    leftovers = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    if not kept:
        assert leftovers == []
        assert "folder is kept" not in err
    else:  # a failure after training steps: one run folder, named on stderr, holding these results
        assert {p.name for p in leftovers} >= set(kept), leftovers
        [run] = {p.relative_to(root).parts[0] for p in leftovers}
        [line] = [line for line in err.splitlines() if "the failed run's folder is kept" in line]
        assert line.startswith(f"adi_lightning: the failed run's folder is kept: {root / run} ")
        if absent:  # no torn file that looks like a result, on disk or in the kept list
            assert not [p for p in leftovers if absent in p.name] and absent not in line, (leftovers, line)


@pytest.mark.parametrize("case", HANDLED, ids=[c.__name__ for c in HANDLED])
def test_odd_input_is_handled(case, tiny_pipeline, tiny_data, tmp_path, capsys, fail_fit_at):
    check, root, _, _, code = _run(case, tiny_pipeline, tiny_data, tmp_path, fail_fit_at)
    assert code in (0, None)
    err = capsys.readouterr().err
    assert "adi_lightning: error" not in err and "Traceback" not in err
    [run] = list(root.iterdir())  # an ordinary run folder
    check(run)


def _readme_rows() -> list[list[str]]:
    """The troubleshooting table's rows (docs/troubleshooting.md), as lists of cells."""
    lines = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| bad input | the error says (paths shortened) | exit code | left on disk |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_readme_table_lists_the_cases_one_to_one():
    rows = _readme_rows()
    inputs = [row[0] for row in rows]
    assert len(inputs) == len(set(inputs)) >= 25
    refused, handled = {c.__doc__ for c in CASES}, {c.__doc__ for c in HANDLED}
    assert set(inputs) == refused | handled, (set(inputs) ^ (refused | handled))
    for cell, _, code, _ in rows:
        assert code == ("0" if cell in handled else "1"), cell


def test_fault_table_names_tests_that_exist():
    """docs/troubleshooting.md's fault rows each name a test function that is defined where it says."""
    import ast

    text = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    named = re.findall(r"\| `(tests/test_\w+\.py)::(test_\w+)` \|$", text, re.M)
    assert len(named) >= 7
    for path, name in named:
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{path}::{name}"
