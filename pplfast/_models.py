"""Loading a causal LM and its tokenizer by name, for every command and the corpus scorer.

One loader, so that `pplfast score`, `compare`, `score-corpus`, `eval` and ``CorpusScorer`` say
the same one line for the same mistake: a local directory that is missing or holds no saved
model is reported as such before transformers is asked (its own message would be "Repo id must
be in the form ..."); hub ids are left to transformers.
"""
from __future__ import annotations

import os

from ._optional import require


class ModelLoadError(ValueError):
    """The model or tokenizer named cannot be loaded (the message is one line)."""


def _looks_like_path(name: str) -> bool:
    # a hub id is "name" or "owner/name"; anything else is meant as a local directory
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_dir(name) -> None:
    """:class:`ModelLoadError` when ``name`` means a local directory that is missing or holds no
    saved Hugging Face model."""
    name = os.fspath(name)
    if not _looks_like_path(name):
        return  # a hub id: transformers reports what is wrong with it
    if not os.path.exists(name):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    if not os.path.isdir(name):
        raise ModelLoadError(f"model {name!r} is a file: pass the directory of a saved model")
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise ModelLoadError(f"model directory {name!r} has no config.json: it is not a saved "
                             "Hugging Face model (save one with model.save_pretrained(dir) and "
                             "tokenizer.save_pretrained(dir))")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _transformers(feature: str):
    transformers = require("transformers", extra="hf", feature=feature)
    transformers.logging.set_verbosity_error()
    # transformers' "Loading weights" bars would interleave with pplfast's own bar
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer(name_or_path):
    """The tokenizer saved with ``name_or_path``, or :class:`ModelLoadError`."""
    transformers = _transformers("loading a tokenizer by name")
    if isinstance(name_or_path, (str, os.PathLike)):
        check_model_dir(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # OSError, ValueError, ...: all mean "no usable tokenizer here"
        raise ModelLoadError(f"cannot load the tokenizer of {str(name_or_path)!r}: "
                             f"{first_line(exc)}") from None


def load_model(name_or_path, *, device, dtype="auto", tokenizer: bool = True):
    """``(model, tokenizer or None)``: the causal LM in eval mode on ``device`` (a
    ``torch.device``), or :class:`ModelLoadError`.

    ``dtype``: a ``torch.dtype``, its name, or ``"auto"`` (the checkpoint's dtype on GPU, float32
    on CPU).
    """
    import torch

    transformers = _transformers("loading a model by name")
    check_model_dir(name_or_path)
    if dtype == "auto":
        dtype = "auto" if device.type == "cuda" else torch.float32
    elif not isinstance(dtype, torch.dtype):
        dtype = getattr(torch, dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    tok = load_tokenizer(name_or_path) if tokenizer else None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **{dtype_kw: dtype})
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {str(name_or_path)!r}: {first_line(exc)}") from None
    try:
        model = model.to(device).eval()
    except Exception as exc:
        raise ModelLoadError(f"cannot move the model to {device}: {first_line(exc)}") from None
    return model, tok
