"""Tokenizers built in memory (no hub, no files): T5 (unigram), CLIP (BPE) and BERT (WordPiece).

Why: tiny test pipelines must build offline, and their tokenizers must round-trip through
``save_pretrained``/``from_pretrained``. Each covers a small English vocabulary as whole-word
tokens, with a character-level fallback so that any prompt tokenizes (characters outside
``CHARS`` map to the unknown token). transformers >= 5 builds all three as fast tokenizers
straight from a vocabulary, so no sentencepiece model file is needed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BertTokenizer, CLIPTokenizer, T5Tokenizer

WORDS: tuple[str, ...] = tuple(
    "a an the on of in with and at to is red green blue yellow white black orange purple gray "
    "circle square triangle star shape background top bottom left right center middle "
    "cat dog photo picture image small large big".split()
)
LOWER = "abcdefghijklmnopqrstuvwxyz"
CHARS = LOWER + "0123456789,.-'!?;:()\"/&"
UPPER = LOWER.upper()  # only T5 is case-sensitive; CLIP and BERT lower-case first


def build_t5_tokenizer(model_max_length: int = 512) -> "T5Tokenizer":
    """T5 unigram tokenizer: pad=0, eos=1, unk=2 like real T5; words beat character pieces by score."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in CHARS + UPPER]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _bpe_merges(words: tuple[str, ...], suffix: str = "</w>") -> list[tuple[str, str]]:
    """Merges under which every word of ``words`` becomes one token.

    Each word is first segmented by the merges found so far (in rank order, as BPE does);
    merges are then appended until it is one piece. Appended merges rank last, so they never
    fire before an earlier word is complete, and earlier words keep their single token.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + suffix]
        while len(pieces) > 1:
            candidates = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
            if candidates:
                _, i = min(candidates)
            else:
                i = 0
                ranks[(pieces[0], pieces[1])] = len(merges)
                merges.append((pieces[0], pieces[1]))
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return merges


def build_clip_tokenizer(model_max_length: int = 77) -> "CLIPTokenizer":
    """CLIP byte-level BPE over ``CHARS`` (each also with the end-of-word ``</w>`` form)."""
    from transformers import CLIPTokenizer

    merges = _bpe_merges(WORDS)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(CHARS) + [c + "</w>" for c in CHARS]
    tokens += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


def build_bert_tokenizer(model_max_length: int = 77) -> "BertTokenizer":
    """BERT WordPiece (lower-cased) with ``##`` character continuations."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *CHARS, *("##" + c for c in CHARS)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)
