"""The tiny offline SD pipeline, tokenizer and action data folder (used by every other CPU test)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest

from adi_lightning.conditioning import cross_attention_layers  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from adi_lightning.tiny import (  # noqa: E402
    DEFAULT_WORDS,
    build_clip_tokenizer,
    build_tiny_action_folder,
    build_tiny_pipeline,
)
from adi_lightning.tiny.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(pipe_dir, low_cpu_mem_usage=False)


def test_default_words_are_single_tokens(pipe_dir):
    tok = CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer")
    assert tok.model_max_length == 77
    for word in DEFAULT_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
        assert tok(word).input_ids == [tok.bos_token_id, tok.convert_tokens_to_ids(word + "</w>"), tok.eos_token_id]
    # "close-up" is three tokens, as in real CLIP; unknown words fall back to byte pieces.
    assert tok.tokenize("a close-up photo") == ["a</w>", "close</w>", "-</w>", "up</w>", "photo</w>"]
    assert len(tok.tokenize("zebra")) > 1
    assert tok.unk_token_id not in tok("zebra").input_ids[1:-1]


def test_tokenizer_repairs_conflicting_merges(tmp_path):
    # "bc"'s merge (b, c</w>) ranks first and strands "abc" as a + bc</w> without the repair loop.
    words = ["bc", "ab", "abc", "café"]
    tok = build_clip_tokenizer(words, tmp_path)
    from_files = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for t in (tok, from_files):
        assert [len(t.tokenize(w)) for w in words] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="pre-tokeniser"):
        build_clip_tokenizer(["close-up"], tmp_path / "bad")


def test_pipeline_structure(pipe):
    paths = list(cross_attention_layers(pipe.unet))
    assert len(paths) == 16
    assert sum(p.startswith("down_blocks.") for p in paths) == 6
    assert sum(p.startswith("mid_block.") for p in paths) == 1
    assert sum(p.startswith("up_blocks.") for p in paths) == 9
    D = pipe.text_encoder.config.hidden_size
    assert D == 32 == pipe.unet.config.cross_attention_dim
    tok = pipe.tokenizer
    cfg = pipe.text_encoder.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (len(tok), tok.bos_token_id, tok.eos_token_id)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.safety_checker is None


def test_text_encoder_pools_at_eos(pipe):
    ids = pipe.tokenizer(["a photo of a person", "a dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids)
    assert out.last_hidden_state.shape == (2, 77, 32)
    eos = (ids == pipe.tokenizer.eos_token_id).int().argmax(-1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])


def test_pipeline_generates(pipe):
    image = pipe(
        "a photo of a person",
        num_inference_steps=2,
        guidance_scale=2.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images[0]
    assert image.size == (32, 32)


def test_fewer_layers_variant(tmp_path):
    from diffusers import UNet2DConditionModel

    out = build_tiny_pipeline(tmp_path, layers_per_block=1, words=["a", "photo"])
    unet = UNet2DConditionModel.from_pretrained(out / "unet", low_cpu_mem_usage=False)
    assert len(list(cross_attention_layers(unet))) == 10  # 3 down + 1 mid + 3 x 2 up
    with pytest.raises(ValueError, match="divisible by 8"):
        build_tiny_pipeline(tmp_path / "bad", sample_size=24)


def test_action_folder(tmp_path):
    actions, subjects = ("jumping", "standing", "waving"), ("red", "green", "blue", "yellow")
    out = build_tiny_action_folder(tmp_path / "a", actions=actions, subjects=subjects)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted((r["subject"], r["action"]) for r in rows) == sorted((s, a) for s in subjects for a in actions)
    for r in rows:
        assert Image.open(out / r["file_name"]).size == (32, 32)
        assert r["pair_id"] == f"{r['subject']}-{r['context']}"
        assert r["caption"] == f"a photo of a {r['subject']} person {r['action']}"
    assert len({r["context"] for r in rows}) == len(subjects)
    again = build_tiny_action_folder(tmp_path / "b", actions=actions, subjects=subjects)
    for r in rows:
        assert (out / r["file_name"]).read_bytes() == (again / r["file_name"]).read_bytes()
    other = build_tiny_action_folder(tmp_path / "c", actions=actions, subjects=subjects, seed=1)
    assert (out / rows[0]["file_name"]).read_bytes() != (other / rows[0]["file_name"]).read_bytes()


def test_cli_builds_then_skips(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "pipeline: built" in first and "L=16" in first and "D=32" in first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "pipeline"]  # no temp leftovers
    mtime = (tmp_path / "pipeline/unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main(["--out", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert "pipeline: " in second and "skipped" in second
    assert (tmp_path / "pipeline/unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    assert main(["--out", str(tmp_path), "--resolution", "64"]) == 2


def test_cli_builds_the_tiny_sdxl_pipeline_next_to_the_sd_one(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--sdxl"]) == 0
    out = capsys.readouterr().out
    assert "pipeline: built" in out and "L=17" in out and "D=32+48" in out
    index = json.loads((tmp_path / "pipeline_xl/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "pipeline_xl"]
    assert main(["--out", str(tmp_path), "--sdxl"]) == 0
    assert "skipped" in capsys.readouterr().out
