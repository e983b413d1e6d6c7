"""``ActionTripleDataModule``: training triples from an action folder, prompt/seed grids for
validation, test and predict (which need no data folder)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from adi_lightning.paths import ToyDifficulty, is_in_cache, toy_cache_dir

from .layout import DataLayoutError, read_action_folder, records_of_action
from .partners import MANIFEST, PartnerSettings, ensure_partners, partner_folder
from .sampler import GlobalBatchSampler, ResumableLoader
from .triples import ActionTripleDataset, ContextPartners, PromptSeedDataset

__all__ = ["DEFAULT_PROMPT_TEMPLATES", "ActionTripleDataModule"]

DEFAULT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a person {}",
    "a picture of a person {}",
    "a photo of one person {}",
    "a rendering of a person {}",
    "a cropped photo of a person {}",
    "a close-up photo of a person {}",
)
DEFAULT_VALIDATION_PROMPTS: tuple[str, ...] = ("a photo of a person <A>",)
DEFAULT_VALIDATION_SEEDS: tuple[int, ...] = (0, 1)
DEFAULT_PREDICT_PROMPTS: tuple[str, ...] = ("a photo of a person <A>",)
DEFAULT_PREDICT_SEEDS: tuple[int, ...] = (0, 1, 2, 3)
DEFAULT_GENERATE_ACTIONS: tuple[str, ...] = ("standing", "sitting")
log = logging.getLogger(__name__)


def _consumed_batches(trainer: L.Trainer) -> int:
    """Training batches (per rank) processed since the run began, over every epoch and resume.

    Lightning restores this counter from the checkpoint before the first pass starts; it counts
    the batch a checkpoint was written after even when that batch's bookkeeping was not finished.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def _check_templates(templates: list[str]) -> None:
    if not templates:
        raise ValueError("data.prompt_templates must not be empty")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"data.prompt_templates: each template needs exactly one '{{}}' "
                             f"where the placeholder goes, got {t!r}")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"data.prompt_templates: template {t!r} has other braces; "
                             f"escape them as '{{{{' / '}}}}' ({err})") from err


class ActionTripleDataModule(L.LightningDataModule):
    """Anchor / context-different / action-different triples of one action, plus prompt grids.

    Args:
        root: Action folder (images + ``metadata.jsonl``). Required for ``fit``; may be None
            for ``predict``/``validate``/``test``, which only generate from prompts.
        action: The target action (the ``action`` value in the metadata). Required for ``fit``.
        resolution: Square training resolution in pixels (512 for SD1.x, 768 for SD2.x-v).
        action_different: Where action-different partners come from. ``require``: same
            subject (and pair_id, else context, when the anchor has them) doing another
            action, as in the paper. ``other_action``: prefer those, else any image of another
            action (weaker: the partner's appearance differs, so less appearance is masked).
            ``generate``: the frozen backbone makes them once before training by
            image-to-image from each anchor with another action word (cached, see
            ``generate_*`` and ``cache_dir``); for exemplar-only folders.
        context_partners: Where context-different partners come from: ``exemplars`` (the other
            exemplars), ``pool`` (the folder's context pool: images of the action marked
            ``"context_pool": true`` in metadata.jsonl, partners only, never trained on),
            ``pool_and_exemplars``, or ``auto`` (the pool when the action has one). A pool lets
            the context test see appearance when every exemplar shares colour and background.
        batch_size: Triples per training step per device (each triple is 3 images).
        num_workers: DataLoader worker processes (0 loads in the main process).
        repeats: Passes over the anchors per epoch (epoch length = anchors * repeats).
        flip_p: Probability of a horizontal flip, one decision for all images of a triple.
        seed: Seeds the shuffle and, with the item index, each item's partner/flip/template
            choice, so a run is reproducible. The shuffle is cut into global batches (batch_size
            x devices) so the same triples meet in a step whatever the number of devices.
        with_partners: Load the two partners with each anchor. Normally linked from the
            model's masking switch; False gives anchor-only batches (no partner images needed).
        prompt_templates: Training prompt templates, each with exactly one ``{}`` where the
            placeholder token goes (the model formats them).
        validation_prompts: Prompts rendered at validation/test (placeholder spelled as the
            model's token, e.g. ``<A>``).
        validation_seeds: Seeds for each validation/test prompt (one image per pair).
        predict_prompts: Prompts rendered by ``predict``.
        predict_seeds: Seeds for each predict prompt.
        generate_actions: Action words for generated partners (``action_different: generate``),
            used in turn; none may be the target action.
        generate_per_anchor: Generated partners per anchor.
        generate_strength: Image-to-image strength in (0, 1]: higher changes the pose more but
            keeps less of the anchor's context.
        generate_steps: Denoising steps of the image-to-image run (times strength are run).
        generate_guidance: Guidance of the image-to-image run; ``None``: the backbone family's default
            (``BackboneFamily.default_guidance_scale``, as for ``model.guidance_scale``).
        eval_subjects: Subjects never in the exemplars (human-like and animal-like) that
            validation and test prompt with the identifier; with a ``model.judge`` their images
            are judged (action / subject accuracy, leaks). Empty: ``validation_prompts`` as given.
        eval_template: The evaluation prompt, ``{}`` standing for the subject.
        test_seeds: Seeds per evaluation subject at ``test`` (None: ``validation_seeds``); keep
            validation during fit small and test larger.
        export_toy_if_missing: The toy experiments' switch: with ``root`` unset, the folder is
            ``<cache>/toy/<toy_difficulty>/<action>`` in this project's cache
            (``$ADI_LIGHTNING_CACHE``, else ``~/.cache/adi_lightning``; ``adi_lightning.paths``),
            exported from the ToyActionWorld on first use. Only folders inside that cache are ever
            exported into: a ``root`` elsewhere is read as the user's data, as without this switch.
        toy_difficulty: Which toy folder to export: ``shared`` (exemplars share colour, pattern
            and background; a context pool differs), ``diverse`` (each exemplar its own
            appearance) or ``shared_no_pool`` (shared, no pool: the context test is blind).
        cache_dir: Where generated partners are cached (default ``<root>/.adi_cache``); reused
            while its manifest matches the settings, regenerated when it does not.
    """

    def __init__(
        self,
        root: str | None = None,
        action: str | None = None,
        resolution: int = 512,
        action_different: Literal["require", "other_action", "generate"] = "require",
        context_partners: ContextPartners = "auto",
        batch_size: int = 1,
        num_workers: int = 0,
        repeats: int = 100,
        flip_p: float = 0.5,
        seed: int = 0,
        with_partners: bool = True,
        prompt_templates: list[str] = list(DEFAULT_PROMPT_TEMPLATES),
        validation_prompts: list[str] = list(DEFAULT_VALIDATION_PROMPTS),
        validation_seeds: list[int] = list(DEFAULT_VALIDATION_SEEDS),
        predict_prompts: list[str] = list(DEFAULT_PREDICT_PROMPTS),
        predict_seeds: list[int] = list(DEFAULT_PREDICT_SEEDS),
        generate_actions: list[str] = list(DEFAULT_GENERATE_ACTIONS),
        generate_per_anchor: int = 2,
        generate_strength: float = 0.6,
        generate_steps: int = 30,
        generate_guidance: float | None = None,
        cache_dir: str | None = None,
        export_toy_if_missing: bool = False,
        toy_difficulty: ToyDifficulty = "shared",
        eval_subjects: list[str] = [],
        eval_template: str = "a photo of a {} <A>",
        test_seeds: list[int] | None = None,
    ) -> None:
        super().__init__()
        # Copy every list: the defaults above are shared objects and must never be mutated.
        prompt_templates = list(prompt_templates)
        validation_prompts = list(validation_prompts)
        validation_seeds = [int(s) for s in validation_seeds]
        predict_prompts = list(predict_prompts)
        predict_seeds = [int(s) for s in predict_seeds]
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"data.resolution must be an integer >= 8, got {resolution!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if repeats < 1:
            raise ValueError(f"data.repeats must be >= 1, got {repeats}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"data.flip_p must be in [0, 1], got {flip_p}")
        if action_different not in ("require", "other_action", "generate"):
            raise ValueError(f"data.action_different must be 'require', 'other_action' or 'generate', "
                             f"got {action_different!r}")
        if generate_per_anchor < 1 or generate_steps < 1 or not 0.0 < generate_strength <= 1.0:
            raise ValueError("data.generate_per_anchor and data.generate_steps must be >= 1 and "
                             f"data.generate_strength in (0, 1], got {generate_per_anchor}, "
                             f"{generate_steps}, {generate_strength}")
        _check_templates(prompt_templates)
        self.root = root
        self.action = action
        self.resolution = resolution
        self.action_different = action_different
        self.context_partners = context_partners
        self.toy_difficulty = toy_difficulty
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.repeats = repeats
        self.flip_p = float(flip_p)
        self.seed = int(seed)
        self.with_partners = bool(with_partners)
        self.prompt_templates = prompt_templates
        self.validation_prompts = validation_prompts
        self.validation_seeds = validation_seeds
        self.predict_prompts = predict_prompts
        self.predict_seeds = predict_seeds
        self.generate_actions = list(generate_actions)
        self.generate_per_anchor = generate_per_anchor
        self.generate_strength = float(generate_strength)
        self.generate_steps = generate_steps
        self.generate_guidance = None if generate_guidance is None else float(generate_guidance)
        self.cache_dir = cache_dir
        if eval_subjects and eval_template.count("{}") != 1:
            raise ValueError(f"data.eval_template needs exactly one '{{}}' for the subject, got {eval_template!r}")
        self.export_toy_if_missing = bool(export_toy_if_missing)
        if self.root is None and self.export_toy_if_missing and action is not None:
            self.root = str(toy_cache_dir(toy_difficulty, action))
        self.eval_subjects = list(eval_subjects)
        self.eval_template = eval_template
        self.test_seeds = [int(s) for s in test_seeds] if test_seeds is not None else None
        self.exemplar_subjects: set[str] = set()
        self.exemplar_contexts: set[str] = set()
        self.exemplar_attributes: list[dict[str, str]] = []
        self.exemplar_paths: list[Path] = []
        self.pool_attributes: list[dict[str, str]] = []  # the action's context-pool images
        self.train_dataset: ActionTripleDataset | None = None
        self.save_hyperparameters()

    @property
    def generates_partners(self) -> bool:
        return self.action_different == "generate" and self.with_partners

    def _partner_settings(self, hparams, guidance: float) -> PartnerSettings:
        """The partner cache's key: these settings and the module's backbone (path, model files'
        sizes and mtimes, variant, revision) and weight dtype."""
        from adi_lightning.backbone import backbone_identity

        source = str(hparams.pretrained_model_name_or_path)
        variant, revision = getattr(hparams, "variant", None), getattr(hparams, "revision", None)
        return PartnerSettings(tuple(self.generate_actions), self.generate_per_anchor, self.generate_strength,
                               self.generate_steps, guidance, self.resolution, self.seed, source,
                               str(getattr(hparams, "weight_dtype", "float32")),
                               backbone_identity(source, variant, revision))

    def _cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.root) / ".adi_cache"

    def _check_fit_keys(self) -> None:
        if self.root is None:
            raise ValueError("data.root must be set for fit: the action folder with "
                             "images and metadata.jsonl")
        if self.action is None:
            raise ValueError("data.action must be set for fit: the action name as written "
                             "in metadata.jsonl")

    def prepare_data(self) -> None:
        """Export the toy folder and generate partners once (local rank zero), when asked to."""
        if self.export_toy_if_missing and self.root and is_in_cache(self.root):
            from adi_lightning.toy.export import ensure_action_folder

            self._check_fit_keys()  # a damaged cached folder is exported again (ensure_action_folder)
            ensure_action_folder(self.root, self.action, repair=True, difficulty=self.toy_difficulty)
        if not self.generates_partners:
            return
        self._check_fit_keys()
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "img2img"):
            raise ValueError("data.action_different=generate needs the ADI model's backbone (run it through fit)")
        anchors = records_of_action(read_action_folder(self.root), self.action)
        guidance = module.family.guidance(self.generate_guidance)
        settings = self._partner_settings(module.hparams, guidance)  # the value in force keys the cache
        generate = partial(module.img2img, strength=self.generate_strength, steps=self.generate_steps,
                           guidance=guidance)
        folder, made = ensure_partners(anchors, self.action, settings, self._cache_dir(), generate)
        log.info("%s generated partners in %s", "made" if made else "reusing", folder)

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the folder for ``fit`` (all errors surface here, not mid-epoch)."""
        records = None
        if self.root is not None and self.action is not None and stage in ("fit", "validate", "test", None):
            records = read_action_folder(self.root)
            anchors = records_of_action(records, self.action)
            self.exemplar_subjects = {a.subject for a in anchors}
            self.exemplar_contexts = {a.context for a in anchors if a.context}
            self.exemplar_attributes = [a.appearance() for a in anchors]
            self.exemplar_paths = [a.path for a in anchors]  # the grid's exemplar strip
            self.pool_attributes = [r.appearance() for r in records_of_action(records, self.action, pool=True)]
        if stage in ("fit", None) and self.train_dataset is None:
            self._check_fit_keys()  # root and action are set past this line, so records were read above
            if self.generates_partners:
                folder = partner_folder(self._cache_dir(), self.action)
                if not (folder / MANIFEST).is_file():
                    raise DataLayoutError(f"{folder}: no generated partners yet; they are made by "
                                          "prepare_data at the start of fit")
                records = records + read_action_folder(folder)
            self.train_dataset = ActionTripleDataset(
                records, action=self.action, resolution=self.resolution,
                action_different="require" if self.generates_partners else self.action_different,
                with_partners=self.with_partners, context_partners=self.context_partners,
                repeats=self.repeats, flip_p=self.flip_p,
                prompt_templates=self.prompt_templates, seed=self.seed,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return ResumableLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(),
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _train_sampler(self) -> GlobalBatchSampler:
        """Global-batch-aligned shuffling, positioned by the batches training has consumed."""
        trainer = self.trainer
        if trainer is None:
            return GlobalBatchSampler(len(self.train_dataset), self.batch_size, seed=self.seed)
        return GlobalBatchSampler(len(self.train_dataset), self.batch_size, trainer.world_size, trainer.global_rank,
                                  self.seed, position=partial(_consumed_batches, trainer))

    def _prompt_loader(self, prompts: list[str], seeds: list[int]) -> DataLoader:
        return DataLoader(PromptSeedDataset(prompts, seeds), batch_size=1, shuffle=False)

    def _eval_loader(self, seeds: list[int]) -> DataLoader:
        if not self.eval_subjects:
            return self._prompt_loader(self.validation_prompts, seeds)
        dataset = PromptSeedDataset([self.eval_template.format(s) for s in self.eval_subjects], seeds,
                                    subjects=self.eval_subjects)
        return DataLoader(dataset, batch_size=1, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.validation_seeds)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_seeds if self.test_seeds is not None else self.validation_seeds)

    def predict_dataloader(self) -> DataLoader:
        return self._prompt_loader(self.predict_prompts, self.predict_seeds)
