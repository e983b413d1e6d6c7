"""Tiny tokenizers built offline: a byte-level CLIP BPE one and a T5 Unigram one (SD3's third encoder).

Why: tests and the CPU demo need a real ``CLIPTokenizer`` (same normaliser, pre-tokeniser, ``</w>``
suffix, bos/eos handling as SD 1.x) without the 49k-token hub vocabulary. The vocabulary holds the
256 byte-unicode base symbols, their ``</w>`` forms, the two special tokens and each given word as
ONE token (``word</w>``), so "a photo of a person" tokenises like in real CLIP: one id per word.

BPE applies the lowest-ranked applicable merge first, so naive per-word merge chains can conflict:
a low-ranked pair from another word may fire first and strand a word in pieces. We therefore
simulate with the real tokenizer and append merges for the stuck pieces until every word is one
token. Appended merges rank last, so they only fire when nothing else applies: they never change a
word that already encodes to one token, which makes the repair loop monotone.

The T5 tokenizer (:func:`build_t5_tokenizer`) is a Unigram model as T5's SentencePiece one, built with
the ``tokenizers``-backed ``T5Tokenizer`` of transformers 5 (which is also ``T5TokenizerFast``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the 256 base symbols of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _symbols(word: str) -> list[str]:
    """Initial BPE symbols of a pre-tokenised word: its byte symbols, the last with ``</w>``."""
    b2u = bytes_to_unicode()
    syms = [b2u[b] for b in word.encode("utf-8")]
    syms[-1] += EOW
    return syms


def word_token(word: str) -> str:
    """The vocabulary entry of a whole word (``word</w>`` in byte-unicode symbols)."""
    return "".join(_symbols(word))


def _normalize_words(words: Iterable[str]) -> list[str]:
    """Dedupe (order kept) and reject words CLIP's pre-tokeniser would split anyway."""
    probe = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    pre = probe.backend_tokenizer.pre_tokenizer
    norm = probe.backend_tokenizer.normalizer
    out: list[str] = []
    for word in words:
        if not isinstance(word, str) or not word:
            raise ValueError(f"tokenizer words must be non-empty strings, got {word!r}")
        if norm.normalize_str(word) != word:
            raise ValueError(f"word {word!r} is not normalised (CLIP lowercases and NFC-normalises)")
        pieces = pre.pre_tokenize_str(word)
        if len(pieces) != 1:
            raise ValueError(
                f"word {word!r} is split by CLIP's pre-tokeniser into {[p for p, _ in pieces]}; "
                "give the parts as separate words"
            )
        if word not in out:
            out.append(word)
    return out


def _initial_merges(words: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merge chain per word: ((p h) o) ... ; shared prefixes reuse merges."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        syms = _symbols(word)
        acc = syms[0]
        for s in syms[1:]:
            pair = (acc, s)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            acc += s
    return merges


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Base symbols, their ``</w>`` forms, merge results (rank order), then bos/eos (as in CLIP)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + EOW for b in base]
    index = {t: i for i, t in enumerate(tokens)}
    for a, b in merges:
        if a + b not in index:
            index[a + b] = len(index)
    for special in (BOS, EOS):
        index[special] = len(index)
    return index


def _stuck_words(tok: CLIPTokenizer, words: list[str]) -> dict[str, list[str]]:
    """Words that do not encode to exactly ``word</w>``, with the pieces they end up in."""
    stuck = {}
    for word in words:
        pieces = tok.tokenize(word)
        if pieces != [word_token(word)]:
            stuck[word] = pieces
    return stuck


def build_merges(words: Iterable[str], max_rounds: int = 50) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges under which every word is one token; raises if the repair does not converge."""
    words = _normalize_words(words)
    merges = _initial_merges(words)
    for _ in range(max_rounds):
        vocab = _vocab(merges)
        tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MODEL_MAX_LENGTH)
        stuck = _stuck_words(tok, words)
        if not stuck:
            return vocab, merges
        seen = set(merges)
        for pieces in stuck.values():
            acc = pieces[0]
            for p in pieces[1:]:
                if (acc, p) not in seen:
                    seen.add((acc, p))
                    merges.append((acc, p))
                acc += p
    raise RuntimeError(
        f"BPE merges did not converge after {max_rounds} rounds; still split: {sorted(stuck)}"
    )


def build_clip_tokenizer(words: Iterable[str], out_dir: str | os.PathLike) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` (+ ``save_pretrained`` files) and return the reloaded tokenizer.

    Every word encodes to one id (``word</w>``); any other text falls back to byte pieces, like real
    CLIP on rare words. The result is verified both through the file-based constructor and through
    ``CLIPTokenizer.from_pretrained(out_dir)`` (transformers 5 only has the tokenizers-backed class;
    ``from_pretrained`` prefers the ``tokenizer.json`` it writes, so both paths are checked).
    """
    words = _normalize_words(words)
    vocab, merges = build_merges(words)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    # Positional on purpose: in transformers 5 the first two parameters are ``vocab``/``merges``
    # (dict/list or file path); ``vocab_file=``/``merges_file=`` keywords are silently ignored and
    # give a 2-token tokenizer.
    from_files = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MODEL_MAX_LENGTH)
    _check(from_files, words, vocab, "CLIPTokenizer(vocab.json, merges.txt)")
    from_files.save_pretrained(out)
    loaded = CLIPTokenizer.from_pretrained(out)
    _check(loaded, words, vocab, "CLIPTokenizer.from_pretrained")
    return loaded


def _check(tok: CLIPTokenizer, words: list[str], vocab: dict[str, int], how: str) -> None:
    """Fail loudly if a load path disagrees with the built vocabulary."""
    if len(tok) != len(vocab) or tok.bos_token_id != vocab[BOS] or tok.eos_token_id != vocab[EOS]:
        raise RuntimeError(
            f"{how}: size {len(tok)} bos {tok.bos_token_id} eos {tok.eos_token_id} disagree with the "
            f"built vocab (size {len(vocab)}, bos {vocab[BOS]}, eos {vocab[EOS]})"
        )
    if tok.model_max_length != MODEL_MAX_LENGTH:
        raise RuntimeError(f"{how}: model_max_length {tok.model_max_length} != {MODEL_MAX_LENGTH}")
    for word in words:
        ids = tok(word)["input_ids"]
        if ids != [vocab[BOS], vocab[word_token(word)], vocab[EOS]]:
            raise RuntimeError(f"{how}: {word!r} encodes to {ids}, expected one token")


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
T5_SPACE = "\u2581"  # SentencePiece's word-start mark
T5_MODEL_MAX_LENGTH = 512


def build_t5_tokenizer(words: Iterable[str], out_dir: str | os.PathLike):
    """Write a tiny T5 Unigram tokenizer (``save_pretrained``) to ``out_dir`` and return it reloaded.

    Pieces: ``<pad>``/``</s>``/``<unk>`` (ids 0/1/2, as T5), ``\u2581``, ``\u2581word`` for each word
    (one id per word, scored above any split) and every printable ASCII character (so ASCII text never
    falls to ``<unk>``, as T5's vocabulary covers it); no sentinel ``<extra_id_*>`` tokens. Encoding
    appends ``</s>`` as T5 does; no normaliser (T5 is case-sensitive). ValueError for an empty word or
    one with whitespace (T5 splits on it). Checked through ``T5Tokenizer.from_pretrained(out_dir)``.
    """
    from transformers import T5Tokenizer

    out: list[str] = []
    for word in words:
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise ValueError(f"T5 tokenizer words must be non-empty strings without whitespace, got {word!r}")
        if word not in out:
            out.append(word)
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [(T5_SPACE, -2.0)]
    vocab += [(T5_SPACE + w, -1.0) for w in out]
    vocab += [(chr(c), -10.0) for c in range(33, 127)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)
    path = Path(out_dir)
    tokenizer.save_pretrained(path)
    loaded = T5Tokenizer.from_pretrained(path)
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    if (len(loaded), loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) != (len(vocab), 0, 1, 2):
        raise RuntimeError(f"T5Tokenizer.from_pretrained: size {len(loaded)} pad/eos/unk {loaded.pad_token_id}/"
                           f"{loaded.eos_token_id}/{loaded.unk_token_id}, expected {len(vocab)} and 0/1/2")
    for word in out:
        if loaded(word)["input_ids"] != [ids[T5_SPACE + word], 1]:
            raise RuntimeError(f"T5Tokenizer.from_pretrained: {word!r} encodes to {loaded(word)['input_ids']}, "
                               "expected one token and </s>")
    return loaded
