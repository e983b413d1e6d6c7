"""Backbone families: one implementation of :class:`BackboneFamily` per diffusers pipeline class.

The family of a pipeline folder is the ``_class_name`` of its ``model_index.json``
(:func:`family_class`); the family of a pipeline object is its class (:func:`family_of`).
"""

from __future__ import annotations

from adi_lightning.backbone import BackboneError
from adi_lightning.families.base import BackboneFamily, Features
from adi_lightning.families.sd import StableDiffusionFamily
from adi_lightning.families.sdxl import StableDiffusionXLFamily

#: Supported pipeline classes (``model_index.json`` ``_class_name``) and their family.
FAMILIES: dict[str, type[BackboneFamily]] = {
    StableDiffusionFamily.pipeline_class_name: StableDiffusionFamily,
    StableDiffusionXLFamily.pipeline_class_name: StableDiffusionXLFamily,
}
#: Known pipeline classes without a family yet, with what they are.
NOT_YET: dict[str, str] = {"StableDiffusion3Pipeline": "SD3, an MMDiT", "FluxPipeline": "FLUX, an MMDiT"}


def family_class(class_name: str, source: str = "the pipeline") -> type[BackboneFamily]:
    """The family of a pipeline class name; BackboneError naming ``source`` and what is supported."""
    if class_name in FAMILIES:
        return FAMILIES[class_name]
    supported = ", ".join(FAMILIES)
    if class_name in NOT_YET:
        raise BackboneError(f"{source} is a {class_name} ({NOT_YET[class_name]}): not yet supported by "
                         f"adi-lightning (supported: {supported})")
    raise BackboneError(f"{source} is a {class_name or 'pipeline without _class_name'}, which adi-lightning does not "
                     f"support (supported: {supported})")


def family_of(pipe) -> BackboneFamily:
    """The family over a loaded pipeline object (its class or a base class names the family)."""
    known = {**FAMILIES, **{family.img2img_class_name: family for family in FAMILIES.values()}}
    for cls in type(pipe).__mro__:
        if cls.__name__ in known:
            return known[cls.__name__](pipe)
    return family_class(type(pipe).__name__, f"a {type(pipe).__name__} object")(pipe)


__all__ = ["BackboneFamily", "Features", "FAMILIES", "family_class", "family_of", "StableDiffusionFamily",
           "StableDiffusionXLFamily"]
