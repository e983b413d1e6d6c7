"""``model.row_groups``: layers that share an identifier row share one text encoding (tiny SD and SDXL)."""

import pytest
import torch

import adi_lightning
from adi_lightning.checks import check_identifier_grouping
from adi_lightning.conditioning import ROW_GROUPS, group_layers, resolve_row_groups

SD15_PATHS = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)] + [
    "mid_block.attentions.0.transformer_blocks.0.attn2"] + [
    f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)]


def test_group_layers_of_sd15_and_sdxl_paths():
    assert group_layers(SD15_PATHS, "layer", 4).tolist() == list(range(16))
    assert group_layers(SD15_PATHS, "attention", 4).tolist() == list(range(16))  # one block per module
    # levels: down 0/1/2 at 0/1/2, mid at 3, up 1/2/3 at 2/1/0
    assert group_layers(SD15_PATHS, "resolution", 4).tolist() == [0, 0, 1, 1, 2, 2, 3] + [2] * 3 + [1] * 3 + [0] * 3
    assert group_layers(SD15_PATHS, "shared", 4).tolist() == [0] * 16
    # SDXL base: down 1 (2 modules x 2 blocks), down 2 (2 x 10), mid (1 x 10), up 0 (3 x 10), up 1 (3 x 2): 70 layers
    xl = [f"down_blocks.1.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(2) for t in range(2)]
    xl += [f"down_blocks.2.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(2) for t in range(10)]
    xl += [f"mid_block.attentions.0.transformer_blocks.{t}.attn2" for t in range(10)]
    xl += [f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(3) for t in range(10)]
    xl += [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(3) for t in range(2)]
    counts = {g: int(group_layers(xl, g, 3).max()) + 1 for g in ROW_GROUPS}
    assert len(xl) == 70 and counts == {"layer": 70, "attention": 11, "resolution": 2, "shared": 1}


def test_layerwise_false_is_shared_and_refused_with_another_grouping():
    assert resolve_row_groups(True, None) == "layer" and resolve_row_groups(False, None) == "shared"
    assert resolve_row_groups(True, "resolution") == "resolution" and resolve_row_groups(False, "shared") == "shared"
    with pytest.raises(ValueError, match="model.layerwise=false means model.row_groups=shared"):
        resolve_row_groups(False, "attention")
    with pytest.raises(ValueError, match="model.row_groups must be one of"):
        resolve_row_groups(True, "block")


def _module(make_module, request, family, **kw):
    if family == "sdxl":
        kw["pretrained_model_name_or_path"] = request.getfixturevalue("tiny_sdxl_pipeline")
    return make_module(**kw)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("row_groups", ROW_GROUPS)
@torch.no_grad()
def test_row_g_reaches_exactly_the_layers_of_group_g_with_one_encoding_per_group(make_module, request, family,
                                                                                  row_groups, record_contexts):
    module = _module(make_module, request, family, row_groups=row_groups)
    identifier, fam = module.identifier, module.family
    layer_to_row = identifier.layer_to_row()
    assert identifier.num_rows == int(layer_to_row.max()) + 1 and identifier.row_groups == row_groups
    recorders = record_contexts(module)
    batch_sizes = []
    hooks = [e.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0])) for e in fam.text_encoders]
    ids = fam.tokenize(["a photo of a person <A>"])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def seen(table):
        features = fam.encode_text(ids, table.unsqueeze(0), layer_to_row)
        module.unet(latents, torch.tensor([500]), **fam.denoiser_inputs(features, torch.float32, (32, 32)))
        return [r.context for r in recorders]

    table = identifier.embedding.detach().clone()
    base = seen(table)
    assert batch_sizes == [identifier.num_rows] * len(fam.text_encoders)  # one encoding per group and encoder
    for hook in hooks:
        hook.remove()
    for row in range(identifier.num_rows):
        perturbed = table.clone()
        perturbed[row] += 1.0
        after = seen(perturbed)
        changed = [i for i in range(identifier.num_layers) if not torch.equal(base[i], after[i])]
        assert changed == [i for i, r in enumerate(layer_to_row.tolist()) if r == row], (row_groups, row)
        for i in changed[1:]:  # one encoding per group, reused by each of its layers
            assert torch.equal(after[i], after[changed[0]])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_grouped_identifier_saves_loads_and_generates_whatever_the_key(make_module, request, family, tmp_path):
    module = _module(make_module, request, family, row_groups="resolution")
    with torch.no_grad():
        module.identifier.embedding.add_(torch.randn_like(module.identifier.embedding))
    path = module.save_identifier(tmp_path / "grouped.safetensors")
    # The default key (one row per layer): the file's grouping is taken for generation.
    loaded = _module(make_module, request, family, identifier_path=str(path))
    assert loaded.identifier.row_groups == "resolution" and loaded.row_groups == "layer"
    assert torch.equal(loaded.identifier.embedding, module.identifier.embedding)
    assert torch.equal(loaded.identifier.layer_to_row(), module.identifier.layer_to_row())
    with pytest.raises(ValueError, match="row_groups=resolution .* but model.row_groups=layer"):
        check_identifier_grouping("fit", loaded.identifier, loaded.row_groups)
    check_identifier_grouping("predict", loaded.identifier, loaded.row_groups)
    ours = module.prompt_embeddings(["a photo of a dog <A>"])
    stock = module.family.pipeline_class().from_pretrained(module.hparams.pretrained_model_name_or_path,
                                                           **module.family.load_kwargs)
    pipe = adi_lightning.install_identifier(stock, path)
    embeds = pipe.encode_prompt("a photo of a dog <A>", device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=False)[0]
    assert torch.allclose(embeds, ours["prompt_embeds"], atol=1e-5)
    adi_lightning.remove_identifier(pipe)
    images = loaded.generate(["a photo of a dog <A>"], [0])
    assert len(images) == 1
    # A one-row export names the layers that read the row it keeps (a group), not "layer <row>".
    from safetensors import safe_open

    from adi_lightning.export import export_identifier

    out = export_identifier(path, tmp_path / "row1.safetensors", "sdxl" if family == "sdxl" else "ti", row=1,
                            lossy=True).path
    with safe_open(str(out), framework="pt") as handle:
        kept = handle.metadata()["kept"]
    group = [p for p, r in zip(module.identifier.layer_paths, module.identifier.layer_to_row().tolist()) if r == 1]
    assert len(group) > 1 and kept.startswith(f"row 1 of {module.identifier.num_rows}, used by {', '.join(group)}, residual ")
