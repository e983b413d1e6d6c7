"""Use a learned identifier from plain Python, with the stock diffusers pipeline.

    pipe = StableDiffusionPipeline.from_pretrained("models/stable-diffusion-v1-5")
    adi_lightning.install_identifier(pipe, "identifier.safetensors")
    image = pipe("a photo of a corgi <A>").images[0]
    adi_lightning.remove_identifier(pipe)

``install_identifier`` hands both sides to the pipeline's backbone family: the denoiser's routing
(:meth:`~adi_lightning.families.BackboneFamily.install_routing`: a :class:`LayerwiseCrossAttnProcessor`
on every ``attn2`` of a UNet, block-wise hooks on an MMDiT) and the text side
(:meth:`~adi_lightning.families.BackboneFamily.install_text`): the placeholder in a copy of each
tokenizer, the identifier overlay in each text encoder, and what makes every prompt (negative
prompts too, hence classifier-free guidance) come out as the L per-layer encodings concatenated
along the token axis (UNet families: stand-in text encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adi_lightning.identifier import read_identifier, rows_for_layers


def run_seeded(pipe, inputs: dict[str, torch.Tensor], seeds: list[int], per_seed: list[dict] | None = None,
               **kwargs) -> list:
    """One image per (prompt, seed), each from its own seeded generator (so a grid cell does not
    depend on the batch it was generated in). ``inputs``: the family's stock-pipeline inputs
    (:meth:`~adi_lightning.families.BackboneFamily.prompt_inputs`), each ``[N, ...]``; ``per_seed``: more
    keyword arguments of each seed's call (image-to-image: its input image,
    :meth:`~adi_lightning.families.BackboneFamily.img2img_inputs`); ``kwargs``: those of every call."""
    outputs = []
    for i, seed in enumerate(seeds):
        generator = torch.Generator(pipe.device).manual_seed(int(seed))
        extra = {} if per_seed is None else per_seed[i]
        one = {name: value[i : i + 1] for name, value in inputs.items()}
        out = pipe(**one, generator=generator, output_type="pil", **extra, **kwargs)
        outputs.append(out.images[0])
    return outputs


@dataclass
class _Installed:
    family: object
    text: dict
    routing: object


def install_identifier(pipe, identifier_path: str | Path, token: str | None = None):
    """Make ``pipe`` accept prompts with the identifier's placeholder (e.g. ``<A>``).

    Args:
        pipe: A stock diffusers pipeline of a supported family (``StableDiffusionPipeline``, ...).
        identifier_path: An ``identifier.safetensors`` written by adi-lightning.
        token: The placeholder to use in prompts; defaults to the one saved in the file.

    Raises a clear error if the pipeline's identifier layers (``attn2`` paths, joint blocks) or text
    width differ from the file's.
    Returns the pipeline (changed in place).
    """
    from adi_lightning.backbone import family_of

    if getattr(pipe, "_adi_installed", None) is not None:
        remove_identifier(pipe)
    family = family_of(pipe)
    table, meta = read_identifier(identifier_path)
    layer_paths = family.identifier_layers()
    rows, layer_to_row = rows_for_layers(identifier_path, table, meta, layer_paths, family.identifier_dim)
    token = token or meta.get("placeholder_token") or "<A>"
    text = family.install_text(rows, token, layer_to_row)
    pipe._adi_installed = _Installed(family, text, family.install_routing())
    return pipe


def remove_identifier(pipe):
    """Undo :func:`install_identifier`: the pipeline's outputs are exactly the original ones."""
    saved = getattr(pipe, "_adi_installed", None)
    if saved is None:
        return pipe
    saved.family.remove_routing(saved.routing)
    saved.family.remove_text(saved.text)
    pipe._adi_installed = None
    return pipe
