"""``POST /v1/completions`` in OpenAI's legacy format, as lm-eval's ``local-completions`` and the
``openai`` client send it: prompt scoring with ``echo`` and ``logprobs``, and ``max_tokens`` 0 or 1
(the one token is the greedy one, the argmax of the same statistics pass). vLLM's
``prompt_logprobs: k`` is answered in vLLM's format.

The log-probabilities of OpenAI's answer condition each token on the whole prompt before it, so a
prompt must fit the model's context: the model reads ``len(prompt) - 1 + max_tokens`` tokens. A
longer prompt is refused (400) rather than scored in windows, which this format cannot express;
``/v1/score`` scores long documents in windows.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict

from .errors import bad_request
from .packing import NO_TARGET, Sequence
from .wire import Prompt, check_range, check_token_budget, logprob, read_prompts
from .wire import texts_of as token_texts

MAX_LOGPROBS = 20


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    prompt: Any = None
    echo: bool = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16  # OpenAI's default, refused: pass 0 or 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    best_of: Optional[int] = None
    stream: bool = False
    stop: Optional[Union[str, List[str]]] = None
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    prompt_logprobs: Optional[int] = None  # vLLM's extra parameter
    seed: Optional[int] = None  # accepted: scoring is deterministic
    user: Optional[str] = None


def check_scoring_only(max_tokens, temperature, *, n=1, stream=False, stop=None,
                       penalties=(), logit_bias=None, field="max_tokens") -> None:
    """Refuse what would make the answer generation rather than scoring (400 naming it)."""
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise bad_request(f"{field} must be 0 or 1, got {max_tokens!r}: this server scores "
                          "prompts and gives at most one token, the greedy one (when the field "
                          "is not given, the API's default is larger)", field)
    if stream:
        raise bad_request("stream is not supported: answers come whole", "stream")
    if n != 1:
        raise bad_request(f"n must be 1, got {n!r}: the one token given is the greedy one", "n")
    if max_tokens == 1:
        if temperature is not None and temperature > 0:
            raise bad_request(f"temperature must be 0 (greedy), got {temperature!r}: this server "
                              "does not sample", "temperature")
        if stop:
            raise bad_request("stop is not supported: the one token given is the greedy one",
                              "stop")
        for name, value in penalties:
            if value:
                raise bad_request(f"{name} must be 0, got {value!r}: the one token given is the "
                                  "greedy one", name)
        if logit_bias:
            raise bad_request("logit_bias is not supported: the one token given is the greedy "
                              "one", "logit_bias")


def check_context(prompts: List[Prompt], max_tokens: int, engine, field: str) -> None:
    for i, p in enumerate(prompts):
        if not p.ids:
            raise bad_request(f"{field}[{i}] has no tokens: there is nothing to score", field)
        reads = len(p.ids) - 1 + max_tokens
        if engine.context is not None and reads > engine.context:
            raise bad_request(
                f"{field}[{i}] has {len(p.ids)} tokens: with max_tokens={max_tokens} the model "
                f"reads {reads}, more than its context of {engine.context} tokens (log-"
                "probabilities here condition on the whole prompt; /v1/score scores longer "
                "documents in windows)", field)


def prompt_sequence(ids: List[int], *, first_read: Optional[int], generate: bool, top_k: int,
                    stats: bool) -> Optional[Sequence]:
    """The sequence that scores tokens ``first_read ..`` of ``ids`` (None: none) and, with
    ``generate``, reads the next token's argmax; None when nothing is read."""
    n = len(ids)
    positions, targets = [], []
    if first_read is not None and n > 1:
        positions = list(range(max(first_read, 1) - 1, n - 1))
        targets = ids[max(first_read, 1):]
    if generate:
        positions.append(n - 1)
        targets.append(NO_TARGET)
    if not positions:
        return None
    fed = torch.tensor(ids if generate else ids[:-1], dtype=torch.long)
    return Sequence(fed, torch.tensor(positions, dtype=torch.long),
                    torch.tensor(targets, dtype=torch.long), stats=stats or generate or top_k > 0,
                    top_k=top_k)


def parse(req: CompletionRequest, engine, max_request_tokens: int):
    """Prompts and sequences of a completion request (400 on anything it cannot score)."""
    check_scoring_only(req.max_tokens, req.temperature, n=req.n, stream=req.stream, stop=req.stop,
                       penalties=(("presence_penalty", req.presence_penalty),
                                  ("frequency_penalty", req.frequency_penalty)),
                       logit_bias=req.logit_bias)
    if req.best_of not in (None, 1):
        raise bad_request(f"best_of must be 1, got {req.best_of!r}", "best_of")
    if req.suffix:
        raise bad_request("suffix is not supported: this server scores prompts", "suffix")
    check_range("logprobs", req.logprobs, 0, MAX_LOGPROBS)
    check_range("prompt_logprobs", req.prompt_logprobs, 0, MAX_LOGPROBS)
    if req.prompt is None:
        raise bad_request("prompt is required", "prompt")
    prompts = read_prompts(req.prompt, "prompt", engine)
    check_token_budget(prompts, max_request_tokens, "prompt")
    check_context(prompts, req.max_tokens, engine, "prompt")
    wants_prompt = req.echo and req.logprobs is not None or req.prompt_logprobs is not None
    top_k = max(req.logprobs or 0, req.prompt_logprobs or 0)
    seqs = [prompt_sequence(p.ids, first_read=0 if wants_prompt else None,
                            generate=req.max_tokens == 1, top_k=top_k,
                            stats=req.prompt_logprobs is not None) for p in prompts]
    return prompts, seqs


def _top(ids, lps, k, texts_of, token=None, token_lp=None) -> dict:
    """OpenAI's ``top_logprobs`` entry: the ``k`` most probable tokens, then the token itself
    (its own log-probability wins where it is among them, so that the two agree exactly)."""
    entry = {}
    for t, lp in zip(ids[:k], lps[:k]):
        entry.setdefault(texts_of[t], token_lp if t == token else lp)
    if token is not None:
        entry.setdefault(texts_of[token], token_lp)
    return {key: logprob(v) for key, v in entry.items()}


def choice(index: int, prompt: Prompt, seq: Optional[Sequence], req: CompletionRequest,
           engine) -> dict:
    ids, n, gen = prompt.ids, len(prompt.ids), req.max_tokens == 1
    r = {k: v.tolist() for k, v in (seq.result.items() if seq is not None else ())}
    wants_prompt = req.echo and req.logprobs is not None or req.prompt_logprobs is not None
    prompt_reads = n - 1 if wants_prompt else 0
    gen_id = r["argmax"][-1] if gen else None
    top_ids, top_lps = r.get("top_k_ids", [[]] * (prompt_reads + gen)), r.get(
        "top_k_logprobs", [[]] * (prompt_reads + gen))
    texts_of = token_texts(engine, ids, [gen_id] if gen else [], *top_ids)
    gen_text = texts_of[gen_id] if gen else ""
    prompt_text = prompt.text if prompt.text is not None else engine.decode(ids)
    out = {"index": index, "text": (prompt_text if req.echo else "") + gen_text,
           "logprobs": None, "finish_reason": "length"}
    token_lps = [-x for x in r.get("nll", [])[:prompt_reads]]
    if req.logprobs is not None:
        k = req.logprobs
        tokens, lps, tops = [], [], []
        if req.echo:
            tokens = [texts_of[t] for t in ids]
            lps = [None] + [logprob(x) for x in token_lps]
            tops = [None] + [_top(top_ids[j], top_lps[j], k, texts_of, ids[j + 1], token_lps[j])
                             for j in range(prompt_reads)]
        if gen:
            gen_lp = r["max_logprob"][-1]
            tokens.append(gen_text)
            lps.append(logprob(gen_lp))
            tops.append(_top(top_ids[-1], top_lps[-1], k, texts_of, gen_id, gen_lp))
        start = 0 if req.echo else len(prompt_text)
        offsets = []
        for t in tokens:
            offsets.append(start)
            start += len(t)
        out["logprobs"] = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                           "text_offset": offsets}
    if req.prompt_logprobs is not None:
        k, ranks = req.prompt_logprobs, r.get("rank", [])
        entries = [None]
        for j in range(prompt_reads):
            entry = {}
            for rank, (t, lp) in enumerate(zip(top_ids[j][:k], top_lps[j][:k]), 1):
                value = token_lps[j] if t == ids[j + 1] else lp
                entry[str(t)] = {"logprob": logprob(value), "rank": rank,
                                 "decoded_token": texts_of[t]}
            entry.setdefault(str(ids[j + 1]), {"logprob": logprob(token_lps[j]),
                                               "rank": ranks[j] + 1,
                                               "decoded_token": texts_of[ids[j + 1]]})
            entries.append(entry)
        out["prompt_logprobs"] = entries
    return out


def response(req: CompletionRequest, engine, prompts: List[Prompt], seqs) -> dict:
    choices = [choice(i, p, s, req, engine) for i, (p, s) in enumerate(zip(prompts, seqs))]
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = req.max_tokens * len(prompts)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": engine.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
