"""What pplfast needs from a causal LM: its body, its output layer and its final logit transform.

The model body (``model.base_model``) gives the final hidden states; the output layer
(``model.get_output_embeddings()``) is applied inside pplfast's hidden-states ops, so no
``(tokens, V)`` tensor exists. How each model's last step maps onto the ops' ``softcap`` then
``temperature`` (:func:`logit_transform`):

- ``final_logit_softcapping`` (Gemma 2/3 and others): ``softcap``.
- Cohere family ``logits * logit_scale``: ``temperature = 1 / logit_scale``.
- Granite family and MiniCPM3 divide by ``logits_scaling``: ``temperature = logits_scaling``.
- HyperCLOVA X multiplies by ``logits_scaling``: ``temperature = 1 / logits_scaling``.

Before scoring, one short probe (:func:`model_head`) compares the model's own logits on a few
tokens with this mapping; a model that does not match (an unknown final transform), has no
separate body or no output layer is scored from its logits instead (``model_head`` gives None).

Also the model's vocabulary, context length and device, the check of token ids against the
vocabulary, and the BOS / prefix-token rules of the window modes.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..vocab_parallel import full, linear_rows

PROBE_TOKENS = 16  # tokens of the probe that checks body + output layer against the model
PROBE = object()  # a head not looked for yet: find the model's head and probe it


@dataclass
class Head:
    """The body and output layer a model is scored with, and its final transform."""

    body: torch.nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    temperature: float
    pad_mask: bool = True  # right-padded batches pass their attention mask to the body

    def op_options(self, backend: str) -> dict:
        """The keyword options of the hidden-states ops for this head."""
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature,
                    backend=backend)


def text_config(model):
    """The model's (text) config, or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def logit_transform(model):
    """``(softcap, temperature)`` that reproduce ``model``'s final logit transform (see module doc)."""
    config = text_config(model)
    if config is None:
        return None, 1.0
    model_type = str(getattr(config, "model_type", "") or "")
    softcap = getattr(config, "final_logit_softcapping", None)
    temperature = 1.0
    logit_scale = getattr(config, "logit_scale", None)
    if model_type.startswith("cohere") and logit_scale:
        temperature = 1.0 / float(logit_scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        if model_type.startswith("granite") or model_type == "minicpm3":
            temperature = float(scaling)
        elif model_type.startswith("hyperclovax"):
            temperature = 1.0 / float(scaling)
    return (float(softcap) if softcap else None), temperature


def _accepts(module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def call_model(module, ids, mask=None):
    """``module(input_ids=ids, attention_mask=mask)``, without the key-value cache."""
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if _accepts(module, "use_cache"):
        kwargs["use_cache"] = False
    return module(**kwargs)


def last_hidden(out) -> torch.Tensor:
    """The final hidden states of a body's output."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


def output_logits(out) -> torch.Tensor:
    """The logits of a model's output."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def find_head(model) -> Optional[Head]:
    """The body and output layer of a causal LM, or None where the model does not expose them."""
    get_out = getattr(model, "get_output_embeddings", None)
    layer = get_out() if callable(get_out) else None
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        get_decoder = getattr(model, "get_decoder", None)
        try:
            body = get_decoder() if callable(get_decoder) else None
        except Exception:  # transformers raises for models without a findable decoder
            body = None
    if body is None or body is model or not isinstance(body, torch.nn.Module):
        return None
    bias = getattr(layer, "bias", None)
    softcap, temperature = logit_transform(model)
    return Head(body, weight, bias if isinstance(bias, torch.Tensor) else None, softcap,
                temperature)


def head_logits(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``hidden`` through the output layer and the final transform."""
    # the GEMM runs in the weight's own dtype, as the model's does: a float32 copy of the whole
    # output layer would cost 2 GB for Llama-3-8B; only the few probe rows' logits are upcast
    # (an output layer split over ranks by vocabulary: these few rows' logits gathered)
    z = linear_rows(hidden.to(device=head.weight.device, dtype=head.weight.dtype), head.weight,
                    head.bias).float()
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z / head.temperature


def probe(model, head: Head, ids: torch.Tensor) -> Optional[str]:
    """Compare the model's logits with body + output layer on ``ids``; None if they agree,
    else why not."""
    try:
        theirs = full(output_logits(call_model(model, ids))).float()
        ours = head_logits(head, last_hidden(call_model(head.body, ids)))
    except Exception as exc:  # an unusual body signature: the logits path still works
        return f"calling the model body failed ({type(exc).__name__}: {exc})"
    if theirs.shape != ours.shape:
        return f"body + output layer give shape {tuple(ours.shape)}, the model {tuple(theirs.shape)}"
    # fp32 matmuls in another order differ by ~1e-6 relative; half precision rounds the logits
    rel = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    bound = rel * max(1.0, float(theirs.abs().max()))
    err = float((ours - theirs).abs().max())
    if not err <= bound:
        return f"logits differ by {err:.3g} (bound {bound:.3g}): an output transform pplfast does not know"
    return None


def needs_pad_mask(body, ids: torch.Tensor) -> bool:
    """Whether right-padded batches must pass their attention mask to ``body``.

    In a causal body the real tokens of a right-padded row never attend to the pads after them
    and keep positions 0..n-1, so their outputs are those of the row alone, with or without the
    mask; without one, attention runs its unmasked causal kernel (twice as fast on CPU for a
    padded batch, and the one flash attention takes). Checked on ``ids`` (one row): its first
    half alone against the whole row with the second half replaced by padding, unmasked. A body
    where they differ (attention beyond the causal mask, positions from the mask) keeps it.
    """
    n = ids.shape[-1] // 2
    if n < 2:
        return True
    padded = ids.clone()
    padded[..., n:] = 0
    try:
        with torch.no_grad():
            alone = last_hidden(call_model(body, ids[..., :n]))
            unmasked = last_hidden(call_model(body, padded))[..., :n, :]
    except Exception:
        return True
    rel = 1e-4 if alone.dtype == torch.float32 else 2e-2  # as probe: kernels sum in other orders
    bound = rel * max(1.0, float(alone.float().abs().max()))
    return not float((unmasked.float() - alone.float()).abs().max()) <= bound


def model_head(model, probe_ids: torch.Tensor) -> Optional[Head]:
    """The body and output layer to score ``model`` with, checked on ``probe_ids`` (a few token
    ids); None (with a warning) when the model must be scored from its logits."""
    head = find_head(model)
    if head is not None:
        ids = probe_ids[:PROBE_TOKENS].unsqueeze(0).to(model_device(model))
        why = probe(model, head, ids)
        if why is not None:
            warnings.warn(f"pplfast: scoring {type(model).__name__} from its logits: {why}")
            return None
        head.pad_mask = needs_pad_mask(head.body, ids)
    return head


def scored_hidden(head: Head, ids, mask, keep) -> torch.Tensor:
    """Final hidden states of the positions ``keep`` marks, on the output layer's device and in
    its dtype (with the model split over devices, the output layer may sit apart from the body)."""
    hidden = last_hidden(call_model(head.body, ids, mask if head.pad_mask else None))
    return hidden[keep.to(hidden.device)].to(device=head.weight.device, dtype=head.weight.dtype)


def model_device(model) -> torch.device:
    """Where the model's (first) parameters are."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def vocab_size(model) -> Optional[int]:
    """Rows of the model's output layer (else ``config.vocab_size``), or None if unknown."""
    get_out = getattr(model, "get_output_embeddings", None)
    layer = get_out() if callable(get_out) else None
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    value = getattr(text_config(model), "vocab_size", None)
    return value if isinstance(value, int) else None


def context_length(model) -> Optional[int]:
    """The longest input the model was trained on (from its config), or None if unknown."""
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def check_ids(name: str, ids: torch.Tensor, vocab: Optional[int], *,
              ignore: Optional[int] = None) -> None:
    """Every id of ``ids`` (but those equal to ``ignore``) lies in ``[0, vocab)``; else
    ValueError naming the first offending position in ``ids``' own indexing. Nothing is checked
    when ``vocab`` is None (unknown)."""
    if vocab is None or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(ids.shape))]
        raise ValueError(f"{name}{index} = {int(ids.reshape(-1)[flat])} is outside the model's "
                         f"vocabulary [0, {vocab})")


def check_window(window, model) -> None:
    """A window longer than the model's context length is refused."""
    context = context_length(model)
    if context is not None and isinstance(window, int) and window > context:
        raise ValueError(f"window={window} is longer than the model's context length {context} "
                         f"(positions past it were never trained): pass window <= {context}")


def prefix_id(model, tokenizer, prefix_token_id) -> int:
    """The token rolling mode predicts the first token from: ``prefix_token_id`` (checked),
    else the tokenizer's or the config's BOS, else EOS."""
    if prefix_token_id is not None:
        V = vocab_size(model)
        if isinstance(prefix_token_id, bool) or not isinstance(prefix_token_id, int) or (
                prefix_token_id < 0 or (V is not None and prefix_token_id >= V)):
            raise ValueError(f"prefix_token_id must be a token id in [0, {V}), "
                             f"got {prefix_token_id!r}")
        return int(prefix_token_id)
    for source in (tokenizer, text_config(model)):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    raise ValueError(
        "mode='rolling' predicts the first token from a prefix token: pass prefix_token_id "
        "(the model config has neither bos_token_id nor eos_token_id)"
    )


def llamacpp_bos(model, tokenizer, prefix_token_id) -> Optional[int]:
    """The token llama.cpp puts first in every chunk: BOS when the tokenizer adds one (checked by
    tokenizing a word), ``prefix_token_id`` when given (the way for :func:`score_model`, which has
    no tokenizer), else None (chunks keep their own first token)."""
    if prefix_token_id is not None:
        return prefix_id(model, tokenizer, prefix_token_id)
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or not isinstance(bos, int):
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if len(ids) and ids[0] == bos else None
