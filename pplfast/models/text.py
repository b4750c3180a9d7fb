"""A text's tokens and what the scored ones cover: the bytes and words behind bits per byte and
word perplexity (lm-evaluation-harness's definitions), for any split of the tokens into scored
and unscored."""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch

_WHITESPACE = re.compile(r"\s+")


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity: ``len(re.split(r"\\s+", text))``."""
    return len(_WHITESPACE.split(text))


class Tokens(NamedTuple):
    """A text's token ids and, where the tokenizer gives offsets, where each token ends in it."""

    ids: torch.Tensor  # int64
    ends: Optional[torch.Tensor]  # int64 character positions; None without an offset mapping


def tokenize(tokenizer, text: str, *, add_special_tokens: bool, ends: bool = True) -> Tokens:
    """``text``'s token ids, with each token's end from a fast tokenizer's offset mapping
    (``ends=False``: without, where every token will be scored and the offsets, which slow
    tokenizing down, are not needed)."""
    if ends and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        token_ends = torch.tensor([end for _, end in enc["offset_mapping"]], dtype=torch.long)
    else:
        enc, token_ends = tokenizer(text, add_special_tokens=add_special_tokens), None
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long).reshape(-1)
    return Tokens(ids, None if token_ends is None else token_ends.reshape(-1))


def _decoded_ends(tokenizer, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Token ends for a tokenizer without offsets: each run of tokens scored alike is decoded
    alone and its last token ends where the decoded lengths add up to (the others cover
    nothing). Exact where decoding a run gives back its text (byte-level BPE); elsewhere a run
    edge may move by the character a decoder drops or adds (SentencePiece's leading space)."""
    ends = torch.empty(len(ids), dtype=torch.long)
    flags = scored.tolist()
    pos = start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or flags[i] != flags[start]:
            pos += len(tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False))
            ends[start:i] = pos
            ends[start : i - 1] = ends[start - 1] if start else 0
            start = i
    return ends


def scored_text_counts(text: str, tokens: Tokens, scored: torch.Tensor,
                       tokenizer=None) -> tuple:
    """``(bytes, words)`` of the part of ``text`` that the scored tokens cover: the denominators
    of bits per byte and word perplexity, which must cover the text whose NLL was summed.

    The text is cut into one piece per token: token ``i`` covers the characters from the end of
    token ``i - 1`` (0 for the first) to its own end, the last token up to the end of the text,
    so the pieces tile the text and a token carries the whitespace before it. Bytes are the
    UTF-8 bytes of the scored pieces; a word (lm-evaluation-harness's, ``re.split(r"\\s+",
    text)``: it starts at 0 and after each whitespace run) counts with the piece where it
    starts. Counts over any split of the tokens add up to the whole text's; with every token
    scored (rolling mode) they are lm-evaluation-harness's, ``len(text.encode())`` and
    :func:`count_words`. ``tokens.ends`` None (no offset mapping): the ends come from decoding
    each run of tokens scored alike with ``tokenizer`` (see :func:`_decoded_ends`).
    """
    if bool(scored.all()):  # also a text without tokens: lm-evaluation-harness's counts
        return len(text.encode("utf-8")), count_words(text)
    if not bool(scored.any()):
        return 0, 0
    ends = tokens.ends if tokens.ends is not None else _decoded_ends(tokenizer, tokens.ids, scored)
    n = len(text)
    hi = torch.cummax(ends.clamp(0, n), 0).values.tolist()
    hi[-1] = n
    # runs of tokens scored alike: [first, stop) for each change of the flag
    edges = [0] + (torch.nonzero(scored[1:] != scored[:-1]).flatten() + 1).tolist() + [len(hi)]
    num_bytes = num_words = 0
    for first, stop in zip(edges[:-1], edges[1:]):
        if not bool(scored[first]):
            continue
        lo = hi[first - 1] if first else 0
        piece = text[lo : hi[stop - 1]]
        num_bytes += len(piece.encode("utf-8"))
        # str.split's whitespace is re's \s: each part starts a word, but for one running on
        # from before the piece; 0 starts an empty word before leading whitespace, and the end
        # of the text one after trailing whitespace (the last token's)
        num_words += len(piece.split())
        if piece[:1] and not piece[0].isspace() and lo > 0 and not text[lo - 1].isspace():
            num_words -= 1
        num_words += lo == 0 and text[:1].isspace()
        num_words += stop == len(hi) and text[-1:].isspace()
    return num_bytes, num_words
