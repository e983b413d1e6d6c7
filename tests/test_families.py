"""One seam per backbone family: the pipeline folder's model_index.json picks the family, and the
module holds whatever family it is given without asking which (issue 15)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from adi_lightning.backbone import BackboneError, family_class, family_of, load_backbone
from adi_lightning.families import StableDiffusionFamily


def _with_class_name(src: str, dst: Path, class_name: str) -> str:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["_class_name"] = class_name
    (dst / "model_index.json").write_text(json.dumps(index))
    return str(dst)


def test_sd_folder_loads_as_the_sd_family(tiny_pipeline):
    family = load_backbone(tiny_pipeline)
    assert isinstance(family, StableDiffusionFamily) and type(family.pipe).__name__ == "StableDiffusionPipeline"
    assert family.identifier_dim == 32 and family.text_dims == [32]
    assert all(not p.requires_grad for part in family.modules().values() for p in part.parameters())
    assert isinstance(family_of(family.pipe), StableDiffusionFamily)
    assert isinstance(family_of(family.stock_pipeline(img2img=True)), StableDiffusionFamily)


@pytest.mark.parametrize("class_name,message", [
    ("FluxKontextPipeline", "FluxKontextPipeline (FLUX.1 Kontext, an MMDiT image editor): not yet supported"),
    ("KandinskyPipeline", "KandinskyPipeline, which adi-lightning does not support"),
])
def test_other_pipeline_classes_are_refused_by_name(tiny_pipeline, tmp_path, make_module, class_name, message):
    folder = _with_class_name(tiny_pipeline, tmp_path / "pipe", class_name)
    with pytest.raises(BackboneError, match=re.escape(message)) as err:
        make_module(pretrained_model_name_or_path=folder)
    assert "supported: StableDiffusionPipeline" in str(err.value) and folder in str(err.value)
    with pytest.raises(BackboneError, match="not yet supported|does not support"):
        family_class(class_name)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("part", ["unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
def test_a_folder_missing_a_part_of_its_family_is_refused_once_by_name(request, tmp_path, family, part):
    source = Path(request.getfixturevalue("tiny_sdxl_pipeline" if family == "sdxl" else "tiny_pipeline"))
    folder = tmp_path / "pipe"
    shutil.copytree(source, folder)
    if not (folder / part).is_dir():  # SD 1.x has no second encoder: nothing to take away
        load_backbone(str(folder))
        return
    shutil.rmtree(folder / part)
    with pytest.raises(BackboneError, match=re.escape(f"missing ['{part}']")) as err:
        load_backbone(str(folder))
    message = str(err.value)
    assert str(folder) in message and message.split(str(folder))[-1].count("missing") == 1  # one check, one error


@pytest.mark.parametrize("pipeline", ["tiny_sd3_pipeline_no_t5", "tiny_flux_pipeline"])
def test_mmdit_latents_use_the_vae_shift_factor(request, pipeline):
    """SD3's and FLUX's latents are ``(mode - shift_factor) * scaling_factor`` (``MMDiTFamily.encode_images``)."""
    family = load_backbone(request.getfixturevalue(pipeline))
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mode = family.vae.encode(pixels).latent_dist.mode()
    config = family.vae.config
    assert config.shift_factor != 0
    assert torch.equal(family.encode_images(pixels), (mode - config.shift_factor) * config.scaling_factor)


def test_family_prompt_inputs_are_the_stock_pipeline_keywords(make_module):
    module = make_module()
    table = module.identifier.embedding.detach()
    inputs = module.prompt_embeddings(["a photo of a dog <A>", "a photo of a cat <A>"])
    assert set(inputs) == {"prompt_embeds", "negative_prompt_embeds"}
    assert inputs["prompt_embeds"].shape == (2, 16 * 77, 32) == inputs["negative_prompt_embeds"].shape
    features = module.family.encode(module.family.tokenize(["a photo of a dog <A>"]), table[None], 16)
    assert torch.equal(features[0], inputs["prompt_embeds"][:1])


def test_module_never_asks_which_family_it_holds():
    import io
    import tokenize

    source = (Path(__file__).parents[1] / "adi_lightning" / "module.py").read_text()
    names = {t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME}
    assert not [n for n in names if "xl" in n.lower() or n.startswith("StableDiffusion")
                or re.fullmatch(r"(text_encoder|tokenizer)_\d", n)]
    for branch in ("family.name", "isinstance(self.family", "type(self.family"):
        assert branch not in source, branch
