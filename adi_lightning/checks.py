"""Refusals of model settings, alone and against the data, before any work starts.

Each message names the key (``model.*`` / ``data.*``), the value given and what would fit.
"""

from __future__ import annotations

from adi_lightning.flow_matching import FLOW_TIME_SAMPLINGS
from adi_lightning.identifier import UNTRAINED
from adi_lightning.masking import MASK_COMBINES, MASK_STATISTICS, UPDATE_FROMS, check_threshold
from adi_lightning.paths import is_in_cache


def check_model_settings(mask_threshold: float, mask_combine: str, mask_statistic: str, update_from: str,
                         timestep_sampling: str, learning_rate: float, weight_decay: float,
                         num_inference_steps: int, large_t_steps: int = 0, large_t_min: float = 0.8,
                         starts: int = 1, start_steps: int = 100) -> None:
    """ValueError for a ``model.*`` value outside its range (the ADIModule arguments of that name)."""
    if mask_combine not in MASK_COMBINES:
        raise ValueError(f"model.mask_combine must be one of {MASK_COMBINES}, got {mask_combine!r}")
    if mask_statistic not in MASK_STATISTICS:
        raise ValueError(f"model.mask_statistic must be one of {MASK_STATISTICS}, got {mask_statistic!r}")
    check_threshold(mask_threshold, mask_statistic)
    if mask_statistic == "change_basis" and mask_combine == "or" and mask_threshold < 1.0:
        raise ValueError("model.mask_combine=or under model.mask_statistic=change_basis keeps every axis of the "
                         "basis (P+): use and, context_only or action_only")
    if update_from not in UPDATE_FROMS:
        raise ValueError(f"model.update_from must be one of {UPDATE_FROMS}, got {update_from!r}")
    if timestep_sampling not in FLOW_TIME_SAMPLINGS:
        raise ValueError(f"model.timestep_sampling must be uniform, importance or cubic (or logit_normal for a "
                         f"flow-matching backbone, SD3), got {timestep_sampling!r}")
    if isinstance(large_t_steps, bool) or not isinstance(large_t_steps, int) or large_t_steps < 0:
        raise ValueError(f"model.large_t_steps must be an integer >= 0 (optimizer steps), got {large_t_steps!r}")
    if not 0.0 <= large_t_min < 1.0:
        raise ValueError(f"model.large_t_min must be in [0, 1) (a fraction of the training timesteps), got {large_t_min!r}")
    for key, value in (("starts", starts), ("start_steps", start_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be an integer >= 1, got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"model.learning_rate must be > 0, got {learning_rate}")
    if not weight_decay >= 0:
        raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}")
    if num_inference_steps < 1:
        raise ValueError("model.num_inference_steps must be >= 1")


def check_timestep_sampling(timestep_sampling: str, supported: tuple[str, ...], family: str) -> None:
    """ValueError when the backbone's training objective cannot draw ``model.timestep_sampling``
    (``supported``: the objective's ``timestep_samplings``; ``family``: the backbone family's name), e.g.
    ``logit_normal``, a flow-time density (SD3), on a DDPM family (SD 1.x/2.x, SDXL)."""
    if timestep_sampling not in supported:
        raise ValueError(f"model.timestep_sampling={timestep_sampling} is not available for this backbone "
                         f"({family}, trained as {'flow matching' if 'logit_normal' in supported else 'DDPM'}): "
                         f"use one of {', '.join(supported)}")


def check_starts_leave_steps(starts: int, start_steps: int, total_steps: int) -> None:
    """ValueError when multi-start's ``starts x start_steps`` steps use up the run's ``total_steps``
    (``trainer.max_steps``), leaving none for the chosen start."""
    if starts > 1 and starts * start_steps >= total_steps:
        raise ValueError(
            f"model.starts={starts} x model.start_steps={start_steps} = {starts * start_steps} steps of starts "
            f"leave none of the run's {total_steps} steps (trainer.max_steps) for the chosen start: "
            "raise trainer.max_steps or lower model.starts / model.start_steps")


def check_subject_words(words: list[str], placeholder_token: str, eval_subjects=()) -> None:
    """ValueError naming ``model.subject_words`` for a duplicate word, the placeholder itself, or a word of
    ``data.eval_subjects`` (``eval_subjects``; case-insensitive): keeping the identifier away from a subject
    the evaluation prompts name would bias that evaluation. (A word of several tokens is refused where its
    embedding is read, ``BackboneFamily.initializer_row``.)"""
    lowered = [str(w).strip().lower() for w in words]
    repeated = sorted({w for w in lowered if lowered.count(w) > 1})
    if repeated:
        raise ValueError(f"model.subject_words names {repeated} more than once: list each word once")
    if placeholder_token.strip().lower() in lowered:
        raise ValueError(f"model.subject_words contains the placeholder {placeholder_token!r}: list the "
                         "exemplars' subject words (e.g. [person, man, woman, child]), not the identifier")
    evaluated = [w for w, low in zip(words, lowered) if low in {str(s).strip().lower() for s in eval_subjects}]
    if evaluated:
        raise ValueError(f"model.subject_words {evaluated} are also data.eval_subjects: keeping the identifier "
                         "away from a subject the evaluation prompts name would bias that evaluation; drop them "
                         "from model.subject_words (or from data.eval_subjects)")


def check_data_fits_model(datamodule, stage: str, mask_threshold: float, update_from: str,
                          mask_combine: str = "and") -> None:
    """ValueError when the data of ``stage`` cannot train these model settings: triples exactly when
    masking is on (``mask_threshold < 1``), no context-pool images in the update, and context-different
    partners that differ from their anchor whenever the context test is used (``mask_combine`` other
    than ``action_only``).

    The last is a refusal, not a warning: the context test removes what changes between the anchor and
    a partner of another subject or context; when the labels say every partner shares the anchor's
    subject and context (one person in one place, no context pool), nothing it removes is appearance,
    and the run would train a different method than the one configured, with no sign of it in the
    results. The message says what to add, or to drop the test (``model.mask_combine=action_only``)."""
    masking = mask_threshold < 1.0
    if stage == "fit" and datamodule is not None and getattr(datamodule, "with_partners", masking) != masking:
        raise ValueError(
            f"data.with_partners={datamodule.with_partners} but model.mask_threshold="
            f"{mask_threshold} (masking {'on' if masking else 'off'}): "
            "masking needs triples, and only masking needs them"
        )
    dataset = getattr(datamodule, "train_dataset", None) if stage == "fit" else None
    if update_from != "anchor" and getattr(dataset, "context_source", "exemplars") != "exemplars":
        raise ValueError(
            f"model.update_from={update_from!r} would train on context-pool images, which are "
            f"context partners only (data.context_partners={dataset.context_partners!r} uses the pool): "
            "use model.update_from=anchor or data.context_partners=exemplars")
    find_same = getattr(dataset, "anchor_without_context_difference", None)
    uses_context = masking and mask_combine != "action_only" and getattr(dataset, "with_partners", False)
    same = find_same() if uses_context and find_same is not None else None
    if same is not None:
        raise ValueError(
            f"{same.path_of_metadata}: every context-different partner of anchor {same.file_name!r} shares its subject="
            f"{same.subject!r} and context={same.context!r}, so the context test (model.mask_combine={mask_combine!r}) "
            "has no other subject or context to remove: add images of the action with another subject or context "
            "(or a context pool: lines with \"context_pool\": true), or use model.mask_combine=action_only")


def check_identifier_grouping(stage: str, identifier, row_groups: str) -> None:
    """ValueError when ``fit`` would train an identifier loaded (``model.identifier_path``) with another
    grouping than ``model.row_groups`` (generation uses the file's grouping whatever the key says)."""
    if stage == "fit" and identifier.row_groups != row_groups:
        raise ValueError(f"model.identifier_path holds an identifier with row_groups={identifier.row_groups} "
                         f"({identifier.num_rows} rows) but model.row_groups={row_groups}: set model.row_groups="
                         f"{identifier.row_groups} to continue training it")


def check_identifier_chosen(stage: str, identifier_path: str | None, ckpt_path, untrained: bool) -> None:
    """ValueError when ``validate`` / ``test`` / ``predict`` would generate with the untrained identifier
    (``untrained``: the table still holds its initial rows) without being asked: no ``model.identifier_path``
    and no ``--ckpt_path``. ``model.identifier_path=untrained`` asks for it (a baseline); an identifier
    trained in the same process (``trainer.fit`` then ``trainer.test``) needs neither."""
    if stage in ("validate", "test", "predict") and identifier_path is None and ckpt_path is None and untrained:
        raise ValueError(f"{stage} has no identifier to use: give --model.identifier_path=<run>/identifier.safetensors "
                         f"or --ckpt_path=<checkpoint>, or --model.identifier_path={UNTRAINED} to {stage} with the "
                         "untrained identifier (every row the initializer word) on purpose")


_MASKING_KEYS = ("mask_combine", "mask_statistic", "update_from", "share_text_encoding")
_PARTNER_KEYS = ("action_different", "context_partners")
_GENERATE_KEYS = ("generate_actions", "generate_per_anchor", "generate_strength", "generate_steps",
                  "generate_guidance", "cache_dir")


def inert_settings(model, data=None) -> dict[str, str]:
    """``{"model.key" | "data.key": why}``: every training setting whose value has no effect under the
    other settings (the one place that says so; the CLI refuses a typed one, notes one from config
    files, and the identifier's metadata records null for it).

    ``model`` and ``data`` are mappings with ``.get`` (a parsed config group, the module's
    hyperparameters); a missing data mapping leaves the data rules out. The rules:

    - masking off (``model.mask_threshold`` = 1.0, P+ / TI): ``model.mask_combine``,
      ``mask_statistic``, ``update_from``, ``share_text_encoding`` and the partner keys
      ``data.action_different``, ``context_partners``, ``generate_*``, ``cache_dir``;
    - ``data.action_different`` other than ``generate``: ``data.generate_*`` and ``cache_dir``;
    - ``model.starts`` = 1: ``model.start_steps``;
    - ``model.large_t_steps`` = 0 with ``model.starts`` = 1: ``model.large_t_min``;
    - ``model.row_groups`` given: ``model.layerwise`` (``row_groups`` decides);
    - ``data.eval_subjects`` empty: ``data.eval_template``; not empty: ``data.validation_prompts``;
    - ``data.export_toy_if_missing`` false: ``data.toy_difficulty``; ``data.root`` set outside this
      project's cache (:func:`adi_lightning.paths.is_in_cache`): both, as the toy export only reads
      and writes the cache.

    β itself is never inert: every statistic gives it a meaning (:func:`adi_lightning.masking.triple_updates`).
    Nor are the partner keys under one test alone (``mask_combine`` ``context_only`` / ``action_only``):
    the update never reads the other test's partner, but the keys still decide whether a folder loads
    (its partners are drawn), what is generated, and the logged role losses.
    """
    inert: dict[str, str] = {}
    beta = model.get("mask_threshold", 0.0)
    if beta == 1.0:  # masking off; a β outside [0, 1] is refused by check_threshold, not here
        why = f"model.mask_threshold={beta} turns masking off (P+ / TI: no triples, no partners)"
        inert.update({f"model.{k}": why for k in _MASKING_KEYS})
        if data is not None:
            inert.update({f"data.{k}": why for k in (*_PARTNER_KEYS, *_GENERATE_KEYS)})
    elif data is not None and data.get("action_different", "require") != "generate":
        why = f"data.action_different={data.get('action_different', 'require')} generates no partners"
        inert.update({f"data.{k}": why for k in _GENERATE_KEYS})
    starts = model.get("starts", 1)
    if starts == 1:
        inert["model.start_steps"] = "model.starts=1 (multi-start off)"
        if model.get("large_t_steps", 0) == 0:
            inert["model.large_t_min"] = "model.large_t_steps=0 and model.starts=1 (no large-t phase, no start scores)"
    if model.get("row_groups") is not None:
        inert["model.layerwise"] = f"model.row_groups={model.get('row_groups')} decides the rows"
    if data is not None:
        if data.get("eval_subjects"):
            inert["data.validation_prompts"] = "data.eval_subjects replaces them with data.eval_template prompts"
        else:
            inert["data.eval_template"] = "data.eval_subjects is empty"
        root = data.get("root")
        if root is not None and not is_in_cache(root):
            why = f"data.root={root} lies outside the project's cache, the only place toy folders are exported to"
            inert.update({"data.toy_difficulty": why, "data.export_toy_if_missing": why})
        elif not data.get("export_toy_if_missing", False):
            inert["data.toy_difficulty"] = "data.export_toy_if_missing is false"
    return inert
