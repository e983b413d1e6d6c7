"""Where the identifier is in a prompt, and whether the text encoder will see it.

One rule, used by every check and by the tokenizer: the placeholder (``model.placeholder_token``,
spelled exactly, case included) counts only as a word of its own, where no letter, digit or
underscore touches it. "a photo of a dog <A>", "<A>, jumping" and "a-sks-b" hold it; with
``placeholder_token=sks``, "a person who asks" does not (``sks`` is inside another word there).
The tokenizer gets the placeholder as ``AddedToken(single_word=True, normalized=False)``
(:func:`add_placeholder_token`), which is the same rule, and
:func:`check_identifier_prompts` verifies prompt by prompt that the two agree.
"""

from __future__ import annotations

import re

import torch

_WORD = re.compile(r"\w")


def _is_word(char: str) -> bool:
    return bool(char) and _WORD.match(char) is not None


def find_placeholder(text: str, token: str, where: str = "prompt") -> int:
    """How many times ``token`` stands as a word of its own in ``text`` (the rule above).

    An occurrence inside a longer word (``sks`` in "asks") is ordinary text and is not counted.

    Raises:
        ValueError: ``token`` is joined to a word across one of its own non-word edges
            ("a dog<A>", "<A>s"): the user wrote the placeholder there, but the tokenizer would
            read it as ordinary text. The message names ``where`` and the prompt.
    """
    count, start = 0, text.find(token)
    while start != -1:
        end = start + len(token)
        before, after = text[start - 1 : start], text[end : end + 1]
        if not _is_word(before) and not _is_word(after):
            count += 1
        elif not ((_is_word(before) and _is_word(token[0])) or (_is_word(after) and _is_word(token[-1]))):
            neighbour = re.search(r"\w+$", text[:start]) if _is_word(before) else re.match(r"\w+", text[end:])
            spaced = text[:start] + " " * _is_word(before) + token + " " * _is_word(after) + text[end:]
            raise ValueError(
                f"{where}: {text!r} joins model.placeholder_token {token!r} to {neighbour.group(0)!r}; the "
                f"identifier is recognised only as a word of its own (write {spaced!r})")
        start = text.find(token, start + 1)
    return count


def replace_placeholder(text: str, token: str, word: str) -> str:
    """``text`` with every occurrence of ``token`` that counts as the placeholder (the rule of
    :func:`find_placeholder`: a word of its own) replaced by ``word``; other text untouched.
    E.g. the action word's own prompt: ``replace_placeholder("a photo of a cat <A>", "<A>", "jumping")``."""
    out, start, done = [], text.find(token), 0
    while start != -1:
        end = start + len(token)
        if not _is_word(text[start - 1 : start]) and not _is_word(text[end : end + 1]):
            out += [text[done:start], word]
            done = end
        start = text.find(token, start + 1)
    return "".join(out) + text[done:]


def tokenize(tokenizer, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
    """Token ids ``[N, T]`` padded to the tokenizer's max length, as Stable Diffusion does."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids if device is None else ids.to(device)


def add_placeholder_token(tokenizer, placeholder: str, templates: list[str] = ()) -> int:
    """Register the placeholder with the tokenizer and return its id.

    The tokenizer finds it only as a word of its own, spelled exactly
    (``AddedToken(single_word=True, normalized=False)``: the rule above).
    Raises ValueError when it "already exists": one existing vocabulary token (``photo`` is
    ``photo</w>``, so ``add_tokens`` would not notice), a word of the prompt templates, or a token
    the tokenizer already has under other matching rules.
    """
    from transformers import AddedToken

    if not placeholder or placeholder != placeholder.strip() or " " in placeholder:
        raise ValueError(f"model.placeholder_token must be one word without spaces, got {placeholder!r}")
    for template in templates:
        if find_placeholder(template, placeholder, "data.prompt_templates"):
            raise ValueError(
                f"model.placeholder_token {placeholder!r} is a word of the prompt template {template!r}"
            )
    vocab = tokenizer.get_vocab()
    if placeholder in vocab:
        added = tokenizer.added_tokens_decoder.get(vocab[placeholder])
        if added is not None and added.single_word and not added.normalized and not added.special:
            return vocab[placeholder]
        raise ValueError(f"model.placeholder_token {placeholder!r} is already in the tokenizer's vocabulary")
    pieces = tokenizer.tokenize(placeholder)
    if len(pieces) == 1 and pieces[0] in vocab:
        raise ValueError(
            f"model.placeholder_token {placeholder!r} already exists in the vocabulary as "
            f"{pieces[0]!r}; choose a string such as '<{placeholder}>'"
        )
    tokenizer.add_tokens([AddedToken(placeholder, single_word=True, normalized=False)])
    return tokenizer.convert_tokens_to_ids(placeholder)


def check_identifier_prompts(tokenizer, token: str, placeholder_id: int, prompts: list[str], where: str) -> list[str]:
    """Check prompts meant for the identifier and return the ones that carry it.

    Every prompt with the placeholder (by :func:`find_placeholder`) must tokenize to as many
    placeholder ids, all within ``tokenizer.model_max_length`` tokens: the text encoder reads no
    further, and a cut-off placeholder would render as the same prompt without it.

    Raises:
        ValueError: naming ``where``, the prompt and its token count (start and end tokens
            included), when a placeholder would be cut off, is joined to a word, or the tokenizer
            disagrees with the rule (a tokenizer whose placeholder was added another way).
    """
    carrying = []
    for prompt in prompts:
        expected = find_placeholder(prompt, token, where)
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
        positions = [i for i, x in enumerate(ids) if x == placeholder_id]
        if len(positions) != expected:
            raise ValueError(
                f"{where}: the tokenizer finds model.placeholder_token {token!r} {len(positions)} time(s) in "
                f"{prompt!r}, but as a word of its own it occurs {expected} time(s)")
        kept = int((tokenize(tokenizer, [prompt])[0] == placeholder_id).sum())
        if kept < len(positions):
            raise ValueError(
                f"{where}: {prompt!r} is {len(ids)} tokens long (start and end tokens included) and "
                f"model.placeholder_token {token!r} is token {positions[kept] + 1} of {len(ids)}, but the text "
                f"encoder reads {tokenizer.model_max_length} tokens (tokenizer.model_max_length), the last "
                "being the end token: the identifier would be cut off. Shorten the prompt or move the "
                "placeholder forward")
        if expected:
            carrying.append(prompt)
    return carrying


def check_run_prompts(datamodule, stage: str, tokenizer, token: str, placeholder_id: int) -> None:
    """At setup, check every prompt of ``stage`` that should carry the identifier.

    ``fit``: each training template (formatted with ``token``) and the evaluation prompts;
    ``validate`` / ``test``: the evaluation prompts (``data.eval_template`` x ``data.eval_subjects``
    when subjects are given, each must carry it; else ``data.validation_prompts``, at least one
    must); ``predict``: ``data.predict_prompts`` (at least one must; neither they nor
    ``data.predict_seeds`` may be empty). Raises ValueError naming the key and the prompt (see
    :func:`check_identifier_prompts`).
    """
    if stage == "fit":
        templates = list(getattr(datamodule, "prompt_templates", None) or [])
        check_identifier_prompts(tokenizer, token, placeholder_id, [t.format(token) for t in templates],
                                 "data.prompt_templates")
    subjects = getattr(datamodule, "eval_subjects", None)
    if subjects and stage in ("fit", "validate", "test"):
        template = datamodule.eval_template
        prompts = [template.format(s) for s in subjects]
        if len(check_identifier_prompts(tokenizer, token, placeholder_id, prompts, "data.eval_template")) < len(prompts):
            raise ValueError(f"data.eval_template {template!r} does not contain model.placeholder_token {token!r}")
        return
    key = "data.predict_prompts" if stage == "predict" else "data.validation_prompts"
    prompts = list(getattr(datamodule, key.split(".")[1], None) or [])
    if stage == "predict":
        for name in ("predict_prompts", "predict_seeds"):
            if hasattr(datamodule, name) and not getattr(datamodule, name):
                raise ValueError(f"data.{name} is empty: predict would generate nothing")
    if prompts and not check_identifier_prompts(tokenizer, token, placeholder_id, prompts, key):
        raise ValueError(f"none of {key} contains model.placeholder_token {token!r}: {prompts}")
