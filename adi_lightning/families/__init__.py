"""Backbone families: one implementation of :class:`BackboneFamily` per diffusers pipeline class.

The family of a pipeline folder is the ``_class_name`` of its ``model_index.json``
(:func:`adi_lightning.backbone.family_class`); the family of a pipeline object is its class
(:func:`adi_lightning.backbone.family_of`). The families know nothing of loading: the backbone
loader sits above them.
"""

from __future__ import annotations

from adi_lightning.families.base import BackboneFamily, Features
from adi_lightning.families.flux import FluxFamily
from adi_lightning.families.sd import StableDiffusionFamily
from adi_lightning.families.sd3 import StableDiffusion3Family
from adi_lightning.families.sdxl import StableDiffusionXLFamily

#: Supported pipeline classes (``model_index.json`` ``_class_name``) and their family.
FAMILIES: dict[str, type[BackboneFamily]] = {
    StableDiffusionFamily.pipeline_class_name: StableDiffusionFamily,
    StableDiffusionXLFamily.pipeline_class_name: StableDiffusionXLFamily,
    StableDiffusion3Family.pipeline_class_name: StableDiffusion3Family,
    FluxFamily.pipeline_class_name: FluxFamily,
}
#: Known pipeline classes without a family yet, with what they are.
NOT_YET: dict[str, str] = {"FluxKontextPipeline": "FLUX.1 Kontext, an MMDiT image editor"}


__all__ = ["BackboneFamily", "Features", "FAMILIES", "FluxFamily", "NOT_YET", "StableDiffusion3Family",
           "StableDiffusionFamily", "StableDiffusionXLFamily"]
