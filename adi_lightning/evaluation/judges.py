"""Judges: name the action, subject and every context / appearance factor a generated image shows.

The toy judges are exact classifiers trained on rendered ground truth; for real data a CLIP
model the user provides scores the image against each candidate text (zero-shot), a proxy.
Configure one as ``model.judge`` (``class_path`` + ``init_args``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

ACTION_AND_SUBJECT = ("action", "subject")


@dataclass
class Judgement:
    """What a judge sees in N images, one label per image.

    ``action`` and ``subject``: ``[N]`` labels. ``factors``: every other factor the judge can see
    (context / appearance), ``{factor: [N] labels}``: ToyJudge ``background``, ``pattern``,
    ``colour``; CLIPJudge ``context`` when it was given candidate contexts.
    """

    action: list[str]
    subject: list[str]
    factors: dict[str, list[str]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, str]]:
        """One ``{"action": ..., "subject": ..., <factor>: ...}`` dict per image."""
        columns = {"action": self.action, "subject": self.subject, **self.factors}
        if any(len(v) != len(self.action) for v in columns.values()):
            raise ValueError(f"a Judgement needs one label per image for every factor, got "
                             f"{ {k: len(v) for k, v in columns.items()} }")
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _features(output) -> torch.Tensor:
    """Projected CLIP features: transformers 5 returns a model output (``pooler_output``), 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class Judge:
    """Base class: ``judge(images) -> Judgement`` (one label per image and factor).

    ``subjects``: the subject names the judge can return (the initializer check warns when the
    initializer is one of them).
    """

    subjects: tuple[str, ...] = ()

    def judge(self, images: list[Image.Image]) -> Judgement:
        raise NotImplementedError


class ToyJudge(Judge):
    """The ToyActionWorld classifiers shipped with the toy pipeline: action, subject and the
    appearance factors ``background``, ``pattern`` and ``colour`` (every head of the judges).

    Args:
        path: Folder or file of the judges (default: the shipped ones).
    """

    def __init__(self, path: str | None = None):
        from adi_lightning.toy.judges import ToyJudges

        self.judges = ToyJudges(path)
        self.subjects = tuple(self.judges.heads["subject"])

    def judge(self, images: list[Image.Image]) -> Judgement:
        labels = self.judges.predict(images)
        return Judgement(labels["action"], labels["subject"],
                         {k: v for k, v in labels.items() if k not in ACTION_AND_SUBJECT})


class CLIPJudge(Judge):
    """Zero-shot CLIP proxy for real data: the candidate text with the highest CLIP score wins.

    Args:
        model_path: A local folder with a transformers ``CLIPModel`` and its processor.
        actions: Candidate action words (must include the learned action).
        subjects: Candidate subjects (the prompted ones and the exemplars').
        contexts: Optional candidate contexts (e.g. "a beach", "a gym"): the judge then names a
            ``context`` factor, compared with the exemplars' contexts (``leak_context``).
        action_template, subject_template, context_template: Texts the candidates go into.
    """

    def __init__(self, model_path: str, actions: list[str], subjects: list[str], contexts: list[str] | None = None,
                 action_template: str = "a photo of someone {}", subject_template: str = "a photo of a {}",
                 context_template: str = "a photo taken in {}"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_path).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path)
        candidates = {"action": (actions, action_template), "subject": (subjects, subject_template)}
        if contexts:
            candidates["context"] = (contexts, context_template)
        self.words = {factor: list(words) for factor, (words, _) in candidates.items()}
        self.subjects = tuple(subjects)
        # The candidate texts are fixed: encode them once. ``[K, P]`` unit features per factor.
        self.text_features = {factor: self.encode_texts([template.format(w) for w in words])
                              for factor, (words, template) in candidates.items()}

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit CLIP text features ``[K, P]``."""
        inputs = self.processor.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                                          max_length=self.processor.tokenizer.model_max_length)
        return _unit(_features(self.model.get_text_features(input_ids=inputs["input_ids"])))

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit CLIP image features ``[N, P]``."""
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return _unit(_features(self.model.get_image_features(pixel_values=pixels)))

    def scores(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """CLIP score ``100 * max(cos(image, text), 0)`` for every image x text: ``[N, K]``."""
        return (100 * self.encode_images(images) @ self.encode_texts(texts).T).clamp(min=0)

    def judge(self, images: list[Image.Image]) -> Judgement:
        image = self.encode_images(images)
        labels = {factor: [self.words[factor][i] for i in (100 * image @ text.T).clamp(min=0).argmax(dim=1).tolist()]
                  for factor, text in self.text_features.items()}
        return Judgement(labels.pop("action"), labels.pop("subject"), labels)
