"""The identifier table: placeholder rules, the embedding overlay, and its safetensors file."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adi_lightning.identifier import (
    IdentifierTokenEmbedding,
    read_identifier,
    token_embedding_owner,
)
from adi_lightning.prompts import add_placeholder_token, tokenize


@pytest.mark.parametrize("word", ["photo", "person", "a"])
def test_placeholder_that_is_an_existing_token_is_refused(make_module, word):
    with pytest.raises(ValueError, match="placeholder_token"):
        make_module(placeholder_token=word)


def test_placeholder_that_is_a_template_word_is_refused(make_module):
    module = make_module(placeholder_token="<jump>")
    with pytest.raises(ValueError, match="prompt template"):
        add_placeholder_token(module.tokenizer, "<jump>", ["a photo of <jump> {}"])


def test_multi_token_initializer_is_refused_naming_the_word(make_module):
    with pytest.raises(ValueError, match="'personcorgi'.*single token"):
        make_module(initializer_token="personcorgi")


def test_rows_start_from_the_initializer_and_are_fp32(make_module):
    module = make_module()
    table = module.identifier.embedding
    assert table.dtype == torch.float32 and table.requires_grad
    standing = module.tokenizer.convert_tokens_to_ids("standing</w>")  # the default initializer
    expected = module.overlay.base.weight[standing]
    assert torch.equal(table, expected.expand_as(table))
    assert torch.equal(module.identifier.initial, table.detach())  # the untrained table, kept apart
    assert "identifier.initial" not in module.state_dict()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["identifier.embedding"]


def test_overlay_sits_where_transformers_reads_token_embeddings(make_module):
    """Fails loudly if a transformers upgrade stops reading embeddings.token_embedding."""
    module = make_module()
    assert isinstance(module.text_encoder.embeddings.token_embedding, IdentifierTokenEmbedding)
    ids = tokenize(module.tokenizer, ["a photo of a person <A>"])
    rows = torch.zeros(1, 32)
    with torch.no_grad(), module.overlay.rows(rows):
        first = module.text_encoder(ids)[0]
    with torch.no_grad(), module.overlay.rows(rows + 1):
        second = module.text_encoder(ids)[0]
    assert not torch.equal(first, second), "text encoder ignored the identifier overlay"


def test_moved_token_embedding_fails_loudly():
    class NewLayout(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)

    with pytest.raises(RuntimeError, match="transformers CLIP text model layout changed"):
        token_embedding_owner(NewLayout())


def test_placeholder_outside_an_encoding_call_is_an_error(make_module):
    module = make_module()
    ids = tokenize(module.tokenizer, ["a photo of a person <A>"])
    with pytest.raises(RuntimeError, match="outside a layer-wise"):
        module.text_encoder(ids)


def test_saved_file_round_trips_with_metadata(make_module, tmp_path):
    module = make_module()
    with torch.no_grad():
        module.identifier.embedding.copy_(torch.randn(16, 32))
    path = module.identifier.save(tmp_path / "id.safetensors", module.identifier_metadata())
    table, meta = read_identifier(path)
    assert torch.equal(table, module.identifier.embedding.detach())
    assert meta["format"] == "adi-lightning-identifier"
    assert (meta["num_layers"], meta["dim"], meta["placeholder_token"]) == ("16", "32", "<A>")
    assert json.loads(meta["layer_paths"]) == module.identifier.layer_paths
    with safe_open(str(path), framework="pt") as handle:
        assert len(list(handle.keys())) >= 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_rows_are_mapped_by_module_path_not_position(make_module, tmp_path):
    module = make_module()
    table = torch.randn(16, 32)
    paths = module.identifier.layer_paths
    order = list(reversed(range(16)))
    meta = {"format": "adi-lightning-identifier", "layer_paths": json.dumps([paths[i] for i in order])}
    save_file({"identifier": table[order].contiguous(), "layer_to_row": torch.arange(16)}, str(tmp_path / "rev.safetensors"), meta)
    module.load_identifier(tmp_path / "rev.safetensors")
    assert torch.equal(module.identifier.embedding.detach(), table)


def test_mismatching_pipeline_is_refused(make_module, tmp_path):
    module = make_module()
    meta = {"format": "adi-lightning-identifier", "layer_paths": json.dumps(module.identifier.layer_paths[:10])}
    save_file({"identifier": torch.zeros(10, 32), "layer_to_row": torch.arange(10)}, str(tmp_path / "a.safetensors"), meta)
    with pytest.raises(ValueError, match="module paths differ"):
        module.load_identifier(tmp_path / "a.safetensors")
    meta = {"format": "adi-lightning-identifier", "layer_paths": json.dumps(module.identifier.layer_paths)}
    save_file({"identifier": torch.zeros(16, 64), "layer_to_row": torch.arange(16)}, str(tmp_path / "b.safetensors"), meta)
    with pytest.raises(ValueError, match="D=64"):
        module.load_identifier(tmp_path / "b.safetensors")


def test_non_finite_identifier_is_never_written(make_module, tmp_path):
    module = make_module()
    with torch.no_grad():
        module.identifier.embedding[3, 4] = float("nan")
    with pytest.raises(FloatingPointError):
        module.identifier.save(tmp_path / "nan.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_diffusers_load_textual_inversion_refuses_the_file(make_module, tmp_path):
    from diffusers import StableDiffusionPipeline

    module = make_module()
    path = module.identifier.save(tmp_path / "id.safetensors", module.identifier_metadata())
    pipe = StableDiffusionPipeline.from_pretrained(module.hparams.pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(Exception):
        pipe.load_textual_inversion(str(path), token="<B>")
    assert "<B>" not in pipe.tokenizer.get_vocab()


def test_initializer_that_is_a_subject_word_warns():
    from adi_lightning.identifier import check_initializer_word

    templates = ["a photo of a person {}"]
    with pytest.warns(UserWarning, match="initializer_token='person' is a word of data.prompt_templates"):
        assert check_initializer_word("person", templates, ["cat"])
    with pytest.warns(UserWarning, match="a subject of the data or the judge"):
        check_initializer_word("Cat", templates, ["cat", "dog"])
    assert check_initializer_word("standing", templates, ["cat", "man"]) == []
