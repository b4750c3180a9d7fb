"""``POST /generate`` in SGLang's native format, as lm-eval's ``sglang-generate`` sends it:
``text`` or ``input_ids`` (one prompt or a batch), ``return_logprob``, ``logprob_start_len``,
``top_logprobs_num`` and ``sampling_params.max_new_tokens`` 0 or 1, answered with
``meta_info.input_token_logprobs`` / ``input_top_logprobs`` (``[logprob, token_id, text]``
triples, text only with ``return_text_in_logprobs``) and the greedy token's ``output_*``.

Differences from SGLang, on purpose: the first scored token is never ``None`` (SGLang's radix
cache holds no logits), only position 0 is; ``logprob_start_len=-1`` (SGLang's default) returns
no input log-probabilities; a prompt must fit the model's context (as in
:mod:`pplfast.serve.openai`).
"""
from __future__ import annotations

import uuid
from typing import Any, List, Optional

from pydantic import BaseModel, ConfigDict

from .errors import bad_request
from .openai import check_context, check_scoring_only, prompt_sequence
from .wire import Prompt, check_range, check_token_budget, logprob, read_prompts
from .wire import texts_of as token_texts

MAX_TOP_LOGPROBS = 64


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None  # not SGLang's: picks one of the served models
    text: Any = None
    input_ids: Any = None
    sampling_params: Optional[dict] = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: Any = None


_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's


def parse(req: GenerateRequest, engine, max_request_tokens: int):
    params = req.sampling_params or {}
    max_new = params.get("max_new_tokens", _DEFAULT_MAX_NEW_TOKENS)
    temperature = params.get("temperature")
    check_scoring_only(max_new, temperature if isinstance(temperature, (int, float)) else None,
                       n=params.get("n", 1), stream=req.stream, stop=params.get("stop"),
                       penalties=[(f"sampling_params.{k}", params.get(k)) for k in
                                  ("frequency_penalty", "presence_penalty")],
                       field="sampling_params.max_new_tokens")
    if temperature is not None and not isinstance(temperature, (int, float)):
        raise bad_request(f"sampling_params.temperature must be a number, got {temperature!r}",
                          "sampling_params.temperature")
    rp = params.get("repetition_penalty")
    if max_new == 1 and rp not in (None, 1, 1.0):
        raise bad_request(f"sampling_params.repetition_penalty must be 1, got {rp!r}",
                          "sampling_params.repetition_penalty")
    check_range("top_logprobs_num", req.top_logprobs_num, 0, MAX_TOP_LOGPROBS)
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    field = "text" if req.text is not None else "input_ids"
    value = req.text if req.text is not None else req.input_ids
    if field == "text" and not (isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(x, str) for x in value))):
        raise bad_request("text must be a string or a list of strings", "text")
    if field == "input_ids" and isinstance(value, str):
        raise bad_request("input_ids must be a list of token ids or a list of lists", "input_ids")
    batch = isinstance(value, list) and bool(value) and not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)
    prompts = read_prompts(value, field, engine)
    check_token_budget(prompts, max_request_tokens, field)
    check_context(prompts, max_new, engine, field)
    start = req.logprob_start_len if req.return_logprob else -1
    if not isinstance(start, int) or start < -1:
        raise bad_request(f"logprob_start_len must be -1 or a position, got {start!r}",
                          "logprob_start_len")
    for i, p in enumerate(prompts):
        if start >= len(p.ids):
            raise bad_request(f"logprob_start_len={start} is past the end of {field}[{i}] "
                              f"({len(p.ids)} tokens)", "logprob_start_len")
    top_k = req.top_logprobs_num if req.return_logprob else 0
    seqs = [prompt_sequence(p.ids, first_read=None if start < 0 else start,
                            generate=max_new == 1, top_k=top_k, stats=False) for p in prompts]
    return prompts, seqs, max_new, start, batch


def _triple(lp, token, texts_of, with_text):
    return [None if lp is None else logprob(lp), token, texts_of[token] if with_text else None]


def response(req: GenerateRequest, engine, prompts: List[Prompt], seqs, max_new: int,
             start: int, batch: bool):
    out = []
    with_text = req.return_text_in_logprobs
    for p, seq in zip(prompts, seqs):
        ids, n = p.ids, len(p.ids)
        r = {k: v.tolist() for k, v in (seq.result.items() if seq is not None else ())}
        reads = n - max(start, 1) if start >= 0 else 0
        nll = r.get("nll", [])
        top_ids = r.get("top_k_ids", [[]] * (reads + max_new))
        top_lps = r.get("top_k_logprobs", [[]] * (reads + max_new))
        gen_id = r["argmax"][-1] if max_new == 1 else None
        texts_of = token_texts(engine, ids, [gen_id], *top_ids)
        meta = {"id": uuid.uuid4().hex, "finish_reason": {"type": "length", "length": max_new},
                "prompt_tokens": n, "completion_tokens": max_new, "cached_tokens": 0}
        if req.return_logprob:
            token_lps, top_lists = [], []
            if start == 0:
                token_lps.append(_triple(None, ids[0], texts_of, with_text))
                top_lists.append(None)
            for j in range(reads):
                tok = ids[max(start, 1) + j]
                token_lps.append(_triple(-nll[j], tok, texts_of, with_text))
                top_lists.append([_triple(-nll[j] if t == tok else lp, t, texts_of, with_text)
                                  for t, lp in zip(top_ids[j], top_lps[j])]
                                 if req.top_logprobs_num else None)
            meta["input_token_logprobs"] = token_lps
            meta["input_top_logprobs"] = top_lists
            if max_new == 1:
                gen_lp = r["max_logprob"][-1]
                meta["output_token_logprobs"] = [_triple(gen_lp, gen_id, texts_of, with_text)]
                meta["output_top_logprobs"] = [
                    [_triple(gen_lp if t == gen_id else lp, t, texts_of, with_text)
                     for t, lp in zip(top_ids[-1], top_lps[-1])] if req.top_logprobs_num
                    else None]
            else:
                meta["output_token_logprobs"], meta["output_top_logprobs"] = [], []
        out.append({"text": texts_of[gen_id] if max_new == 1 else "", "meta_info": meta})
    return out if batch else out[0]
