"""Tokenizers built in memory (no hub): a T5 (unigram) and a CLIP (BPE) tokenizer over a small
English vocabulary with character fallback, so any lowercase prompt tokenizes."""
from __future__ import annotations

WORDS = (
    "a an the on of in with and red green blue yellow white black circle square triangle background "
    "top bottom left right center cat dog photo picture small large"
).split()
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def build_t5_tokenizer(model_max_length: int = 512):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"] + [c for c in CHARS] + [c + "</w>" for c in CHARS]
    merges = []
    for w in WORDS:
        # merge characters left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        piece = w[0]
        for i, ch in enumerate(w[1:], start=1):
            right = ch + ("</w>" if i == len(w) - 1 else "")
            merges.append((piece, right))
            piece = piece + right
            tokens.append(piece)
        if len(w) == 1:
            tokens.append(w + "</w>")
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=model_max_length,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_bert_tokenizer(model_max_length: int = 77):
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + WORDS + list(CHARS) + ["##" + c for c in CHARS]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, model_max_length=model_max_length)
