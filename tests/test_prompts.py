"""Prompts and the placeholder: one rule says where the identifier is, and no prompt loses it.

docs/cli.md "Prompts and the placeholder"; the CLI rows are in tests/test_bad_inputs.py.
"""

import pytest

from adi_lightning.prompts import add_placeholder_token, tokenize

# (text, whole-word occurrences of "sks")
SKS_CASES = [
    ("a photo of a person who asks", 0),
    ("a photo of a person sks", 1),
    ("sks, jumping", 1),
    ("a photo of sks sks", 2),
    ("a-sks-b", 1),
    ("a_sks", 0),
    ("asks sks", 1),
]


def _placeholder_counts(module, texts):
    return (tokenize(module.tokenizer, texts) == module.placeholder_id).sum(dim=1).tolist()


def test_placeholder_inside_another_word_does_not_get_the_identifier(make_module):
    module = make_module(placeholder_token="sks")
    assert _placeholder_counts(module, ["a photo of a person who asks", "a photo of a person sks"]) == [0, 1]


def test_the_checks_and_the_tokenizer_find_the_placeholder_in_the_same_places(make_module):
    from adi_lightning.prompts import find_placeholder

    module = make_module(placeholder_token="sks")
    texts = [text for text, _ in SKS_CASES]
    expected = [count for _, count in SKS_CASES]
    assert [find_placeholder(text, "sks") for text in texts] == expected
    assert _placeholder_counts(module, texts) == expected
    # The template check uses the same rule: 'asks' is not the word 'sks', 'sks' is.
    add_placeholder_token(module.tokenizer, "sks", ["a photo of a person who asks {}"])
    with pytest.raises(ValueError, match="prompt template"):
        add_placeholder_token(module.tokenizer, "sks", ["a photo of sks {}"])


@pytest.mark.parametrize("text", ["a photo of a dog<A>", "a photo of a <A>s", "x<A>y"])
def test_placeholder_joined_to_a_word_is_refused_not_silently_dropped(make_module, text):
    from adi_lightning.prompts import find_placeholder

    module = make_module()
    assert _placeholder_counts(module, [text]) == [0]  # the tokenizer reads it as ordinary text
    with pytest.raises(ValueError, match=r"data.validation_prompts: .* joins model.placeholder_token '<A>' to"):
        find_placeholder(text, "<A>", "data.validation_prompts")


def _words_then_placeholder(words: int) -> str:
    """``words`` one-token words, then ``<A>``: the placeholder is token ``words + 2`` (after the start token)."""
    return " ".join(["a"] * words + ["<A>"])


def test_placeholder_past_the_text_encoders_window_is_refused_naming_prompt_and_count(make_module):
    from adi_lightning.prompts import check_identifier_prompts

    module = make_module()
    assert module.tokenizer.model_max_length == 77
    last_kept, cut = _words_then_placeholder(74), _words_then_placeholder(75)
    assert _placeholder_counts(module, [last_kept, cut]) == [1, 0]  # what the text encoder sees
    assert check_identifier_prompts(module.tokenizer, "<A>", module.placeholder_id, [last_kept, "a dog"], "k") == [last_kept]
    with pytest.raises(ValueError, match=r"^k: 'a a .* <A>' is 78 tokens long .* is token 77 of 78, but the text encoder reads 77 tokens \(tokenizer.model_max_length\)"):
        check_identifier_prompts(module.tokenizer, "<A>", module.placeholder_id, [cut], "k")


def test_generating_from_a_prompt_whose_identifier_is_cut_off_is_an_error(make_module):
    module = make_module()
    module.prompt_embeddings([_words_then_placeholder(74)])
    with pytest.raises(ValueError, match="cut off"):
        module.prompt_embeddings([_words_then_placeholder(75)])


@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_every_evaluation_prompt_is_checked_at_setup(make_module, stage):
    from types import SimpleNamespace

    from adi_lightning.prompts import check_run_prompts

    module = make_module()
    data = SimpleNamespace(prompt_templates=["a photo of a person {}"], eval_template="a photo of a {} <A>",
                           eval_subjects=["dog", " ".join(["big"] * 80) + " cat"])
    with pytest.raises(ValueError, match=r"^data.eval_template: 'a photo of a big .* cat <A>' is \d+ tokens long"):
        check_run_prompts(data, stage, module.tokenizer, "<A>", module.placeholder_id)
