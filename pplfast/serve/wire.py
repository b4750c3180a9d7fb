"""What the wire formats share: reading prompts (text or token ids) with errors that name the
field, the request limits, and JSON-safe numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

from .errors import bad_request

# vLLM's stand-in for a log-probability of -inf (JSON has no infinities); NaN becomes null
NEG_INF_LOGPROB = -9999.0


@dataclass
class Prompt:
    """One prompt: its token ids, and its text when it came as text (else None) with where each
    token ends in it (a fast tokenizer's offsets; None without them)."""

    ids: List[int]
    text: Optional[str]
    ends: Any = None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ids(ids, where: str, vocab: int, field: str) -> None:
    for j, t in enumerate(ids):
        if not _is_int(t):
            raise bad_request(f"{where}[{j}] must be a token id (an integer), got {t!r}", field)
        if not 0 <= t < vocab:
            raise bad_request(f"{where}[{j}] = {t} is outside the model's vocabulary "
                              f"[0, {vocab})", field)


def read_prompts(value: Any, field: str, engine, *, add_special_tokens: bool = True
                 ) -> List[Prompt]:
    """``value`` as a list of prompts: a string, a list of strings, a list of token ids or a list
    of lists of token ids (OpenAI's ``prompt``). Text is tokenized with ``engine``'s tokenizer;
    ids are checked against its vocabulary."""
    kinds = ("a string, a list of strings, a list of token ids or a list of lists of token ids")
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise bad_request(f"{field} must be {kinds}, got {type(value).__name__}", field)
    if not value:
        raise bad_request(f"{field} is empty", field)
    flat = all(_is_int(x) for x in value)  # one prompt of token ids
    prompts = []
    for i, item in enumerate([value] if flat else value):
        where = field if flat else f"{field}[{i}]"
        if isinstance(item, str):
            tokens = engine.tokenize(item, add_special_tokens=add_special_tokens)
            prompts.append(Prompt(tokens.ids.tolist(), item, tokens.ends))
        elif isinstance(item, list):
            _check_ids(item, where, engine.vocab_size, field)
            prompts.append(Prompt(list(item), None))
        else:
            raise bad_request(f"{field} must be {kinds}; {where} is {type(item).__name__}", field)
    return prompts


def check_token_budget(prompts: List[Prompt], limit: int, field: str) -> int:
    total = sum(len(p.ids) for p in prompts)
    if total > limit:
        raise bad_request(f"{field} holds {total} tokens, more than this server takes in one "
                          f"request (--max-request-tokens={limit})", field)
    return total


def check_range(name: str, value, low: int, high: Optional[int]) -> None:
    if value is None:
        return
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise bad_request(f"{name} must be an integer {bound}, got {value!r}", name)


def logprob(x: float) -> Optional[float]:
    """A log-probability for OpenAI / SGLang JSON: -inf as vLLM writes it, NaN as null."""
    if math.isnan(x):
        return None
    return NEG_INF_LOGPROB if x == -math.inf else x


def number(x: float) -> Optional[float]:
    """A float for the native JSON: NaN and infinities become null (as pplfast's score files)."""
    return x if math.isfinite(x) else None


def texts_of(engine, *id_lists) -> dict:
    """Token id -> its text, for every id (>= 0) of the lists."""
    ids = sorted({int(t) for lst in id_lists for t in lst if t is not None and t >= 0})
    return dict(zip(ids, engine.token_texts(ids)))
