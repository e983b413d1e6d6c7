"""Judges: name the action, subject and context that a generated image shows.

The toy judges are exact classifiers trained on rendered ground truth; for real data a CLIP
model the user provides scores the image against each candidate text (zero-shot), a proxy.
Configure one as ``model.judge`` (``class_path`` + ``init_args``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class Judgement:
    action: list[str]
    subject: list[str]
    context: list[str] | None = None


def _features(output) -> torch.Tensor:
    """Projected CLIP features: transformers 5 returns a model output (``pooler_output``), 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class Judge:
    """Base class: ``judge(images) -> Judgement`` (one label per image and factor)."""

    def judge(self, images: list[Image.Image]) -> Judgement:
        raise NotImplementedError


class ToyJudge(Judge):
    """The ToyActionWorld classifiers shipped with the toy pipeline.

    Args:
        path: Folder or file of the judges (default: the shipped ones).
        context_factor: Which toy factor counts as context for the context-leak rate
            (``background``, ``pattern`` or ``colour``).
    """

    def __init__(self, path: str | None = None, context_factor: str = "background"):
        from adi_lightning.toy.judges import ToyJudges

        self.judges = ToyJudges(path)
        if context_factor not in self.judges.heads:
            raise ValueError(f"context_factor must be one of {sorted(self.judges.heads)}, got {context_factor!r}")
        self.context_factor = context_factor

    def judge(self, images: list[Image.Image]) -> Judgement:
        labels = self.judges.predict(images)
        return Judgement(labels["action"], labels["subject"], labels[self.context_factor])


class CLIPJudge(Judge):
    """Zero-shot CLIP proxy for real data: the candidate text with the highest CLIP score wins.

    Args:
        model_path: A local folder with a transformers ``CLIPModel`` and its processor.
        actions: Candidate action words (must include the learned action).
        subjects: Candidate subjects (the prompted ones and the exemplars').
        contexts: Optional candidate contexts (e.g. "a beach", "a gym") for the context-leak rate.
        action_template, subject_template, context_template: Texts the candidates go into.
    """

    def __init__(self, model_path: str, actions: list[str], subjects: list[str], contexts: list[str] | None = None,
                 action_template: str = "a photo of someone {}", subject_template: str = "a photo of a {}",
                 context_template: str = "a photo taken in {}"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_path).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path)
        self.candidates = {"action": (list(actions), action_template), "subject": (list(subjects), subject_template)}
        if contexts:
            self.candidates["context"] = (list(contexts), context_template)

    @torch.no_grad()
    def scores(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """CLIP score ``100 * max(cos(image, text), 0)`` for every image x text: ``[N, K]``."""
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding="max_length",
                                truncation=True, max_length=self.processor.tokenizer.model_max_length)
        image = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _features(self.model.get_text_features(input_ids=inputs["input_ids"]))
        return (100 * _unit(image) @ _unit(text).T).clamp(min=0)

    def judge(self, images: list[Image.Image]) -> Judgement:
        labels = {}
        for factor, (words, template) in self.candidates.items():
            best = self.scores(images, [template.format(w) for w in words]).argmax(dim=1)
            labels[factor] = [words[i] for i in best.tolist()]
        return Judgement(labels["action"], labels["subject"], labels.get("context"))
