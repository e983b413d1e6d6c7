"""Every cross-attention layer receives its own identifier row, routed by module path."""

import pytest
import torch

from adi_lightning.conditioning import (
    cross_attention_layers,
    encode_layerwise,
    remove_layerwise_processors,
)
from adi_lightning.prompts import tokenize


@torch.no_grad()
def _contexts(module, table, recorders):
    ids = tokenize(module.tokenizer, ["a photo of a person <A>"])
    context = encode_layerwise(module.text_encoder, module.overlay, ids, table.unsqueeze(0), module.identifier.num_layers)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    module.unet(latents, torch.tensor([500]), context)
    return [r.context for r in recorders]


def test_rows_follow_unet_order_by_module_path(make_module):
    module = make_module()
    paths = module.identifier.layer_paths
    assert len(paths) == 16
    assert [p.split(".")[0] for p in paths] == ["down_blocks"] * 6 + ["mid_block"] + ["up_blocks"] * 9
    # attn_processors lists the mid block last; our order must not depend on dict order.
    dict_order = [k.removesuffix(".processor") for k in module.unet.attn_processors if ".attn2." in k]
    assert sorted(dict_order) == sorted(paths) and dict_order != paths
    for index, attn in enumerate(cross_attention_layers(module.unet).values()):
        assert attn.processor.layer_index == index


def test_perturbing_row_l_changes_only_layer_l(make_module, record_contexts):
    module = make_module(layerwise=True)
    recorders = record_contexts(module)
    table = module.identifier.embedding.detach().clone()
    base = _contexts(module, table, recorders)
    assert len(base) == 16
    tokens = module.tokenizer.model_max_length
    assert all(c.shape == (1, tokens, 32) for c in base)
    for layer in range(16):
        perturbed = table.clone()
        perturbed[layer] += 1.0
        after = _contexts(module, perturbed, recorders)
        changed = [i for i in range(16) if not torch.equal(base[i], after[i])]
        assert changed == [layer]


def test_each_layer_sees_the_encoding_of_its_own_row(make_module, record_contexts):
    module = make_module(layerwise=True)
    recorders = record_contexts(module)
    table = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    seen = _contexts(module, table, recorders)
    ids = tokenize(module.tokenizer, ["a photo of a person <A>"])
    for layer in (0, 6, 15):
        with module.overlay.rows(table[layer : layer + 1]), torch.no_grad():
            alone = module.text_encoder(ids)[0]
        assert torch.allclose(seen[layer], alone, atol=1e-6)


def test_shared_row_feeds_every_layer(make_module, record_contexts):
    module = make_module(layerwise=False)
    assert module.identifier.num_rows == 1
    recorders = record_contexts(module)
    table = module.identifier.embedding.detach().clone()
    base = _contexts(module, table, recorders)
    assert all(torch.equal(base[0], c) for c in base[1:])
    after = _contexts(module, table + 1.0, recorders)
    assert all(not torch.equal(b, a) for b, a in zip(base, after))


def test_plain_context_is_a_clear_error_and_removal_restores_the_pipeline(make_module):
    module = make_module()
    ids = tokenize(module.tokenizer, ["a photo of a person"])
    with torch.no_grad():
        plain = module.text_encoder(ids)[0]  # [1, 77, D]: not L*T tokens
        latents = torch.randn(1, 4, 16, 16)
        with pytest.raises(ValueError, match="concatenated along the token axis"):
            module.unet(latents, torch.tensor([10]), plain)
        remove_layerwise_processors(module.unet)
        assert module.unet(latents, torch.tensor([10]), plain).sample.shape == latents.shape
