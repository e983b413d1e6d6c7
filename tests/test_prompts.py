"""Prompts and the placeholder: one rule says where the identifier is.

README "Prompts and the placeholder"; the CLI rows are in tests/test_bad_inputs.py.
"""

import pytest

from adi_lightning.conditioning import tokenize
from adi_lightning.identifier import add_placeholder_token

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
