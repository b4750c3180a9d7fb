"""Loading a causal LM and its tokenizer by name, for every command, the corpus scorer and the
server: the one loader, the one list of weight dtypes (:data:`DTYPES`) and the one device parser
(:func:`parse_device`).

One loader, so that `pplfast score`, `compare`, `score-corpus`, `eval` and ``CorpusScorer`` say
the same one line for the same mistake: a local directory that is missing or holds no saved
model is reported as such before transformers is asked (its own message would be "Repo id must
be in the form ..."); hub ids are left to transformers.

Local directory or hub id, told apart without a network call (:func:`is_local`): an existing
path is local; so is a name a hub id cannot be (``./x``, ``/x``, ``~/x``, ``a/b/c``). A name of
the hub's form, ``name`` or ``owner/name``, is a hub id when the Hugging Face cache holds that
model; otherwise it is a missing local directory when ``owner`` is a local folder (``models/x``
beside a ``models`` folder) and refused when the hub is offline (``HF_HUB_OFFLINE``); else it is
left to the hub. So a typo in a local path is said at once instead of after the hub's
connection retries.
"""
from __future__ import annotations

import os

from .._optional import require

# the dtypes a model's weights are loaded in: "auto" is the checkpoint's dtype on GPU, float32 on CPU
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(ValueError):
    """The model or tokenizer named cannot be loaded (the message is one line)."""


def _looks_like_path(name: str) -> bool:
    # a hub id is "name" or "owner/name"; anything else is meant as a local directory
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.endswith("/") or (os.sep != "/" and os.sep in name))


def _hub():
    try:
        from huggingface_hub import constants
    except ImportError:  # transformers brings it; without it nothing can come from the hub
        return None
    return constants


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds a model repository ``name`` (any revision)."""
    hub = _hub()
    cache = getattr(hub, "HF_HUB_CACHE", None)
    return bool(cache) and os.path.isdir(os.path.join(cache, "models--" + name.replace("/", "--")))


def _hub_offline() -> bool:
    return bool(getattr(_hub(), "HF_HUB_OFFLINE", False))


def is_local(name: str) -> bool:
    """Whether ``name`` means a local directory rather than a hub id (see the module doc);
    :class:`ModelLoadError` for a hub id that cannot be reached: offline and not cached."""
    if _looks_like_path(name):
        return True
    if _in_hub_cache(name):
        return False
    owner, slash, _ = name.partition("/")
    if slash and os.path.isdir(owner):
        return True
    if _hub_offline():
        raise ModelLoadError(f"model {name!r} is neither a local directory nor in the Hugging "
                             "Face cache, and the hub is offline (HF_HUB_OFFLINE)")
    return False


def check_model_dir(name, *, what: str = "model") -> None:
    """:class:`ModelLoadError` when ``name`` means a local directory that is missing or, for
    ``what="model"``, holds no saved Hugging Face model; or a hub id the offline hub cannot give."""
    name = os.fspath(name)
    if not is_local(name):
        return  # a hub id: transformers reports what is wrong with it
    if not os.path.exists(name):
        raise ModelLoadError(f"{what} directory {name!r} does not exist")
    if not os.path.isdir(name):
        raise ModelLoadError(f"{what} {name!r} is a file: pass the directory of a saved {what}")
    if what == "model" and not os.path.isfile(os.path.join(name, "config.json")):
        raise ModelLoadError(f"model directory {name!r} has no config.json: it is not a saved "
                             "Hugging Face model (save one with model.save_pretrained(dir) and "
                             "tokenizer.save_pretrained(dir))")


def parse_device(device, *, option: str = "device"):
    """``device`` (a name such as ``cpu``, ``cuda``, ``cuda:1``, or a ``torch.device``) as a
    ``torch.device`` this machine has; None (or ``"auto"``) means cuda when available, else cpu.
    ValueError naming ``option`` (``--device`` on the command line) and the value otherwise."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"bad {option} {device!r}: {first_line(exc)}") from None
    if parsed.type == "meta":
        raise ValueError(f"{option} meta holds no data and cannot run a model: use cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device!r}: this machine has no CUDA GPU (use cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if not (callable(available) and available()):
            raise ValueError(f"{option} {device!r} is not available on this machine (use cpu or "
                             "cuda)")
    return parsed


def check_dtype(dtype, *, option: str = "dtype"):
    """``dtype`` if it is one of :data:`DTYPES` or a ``torch.dtype``, else ValueError."""
    import torch

    if not (isinstance(dtype, torch.dtype) or (isinstance(dtype, str) and dtype in DTYPES)):
        raise ValueError(f"{option} must be one of {DTYPES} or a torch.dtype, got {dtype!r}")
    return dtype


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _transformers(feature: str):
    transformers = require("transformers", extra="hf", feature=feature)
    transformers.logging.set_verbosity_error()
    # transformers' "Loading weights" bars would interleave with pplfast's own bar
    transformers.utils.logging.disable_progress_bar()
    return transformers


# what a saved tokenizer holds in any case (save_pretrained writes tokenizer_config.json)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(name_or_path, **options):
    """The tokenizer saved with ``name_or_path`` (``options`` go to ``AutoTokenizer``), or
    :class:`ModelLoadError`."""
    transformers = _transformers("loading a tokenizer by name")
    if isinstance(name_or_path, (str, os.PathLike)):
        check_model_dir(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path, **options)
    except Exception as exc:  # OSError, ValueError, ...: all mean "no usable tokenizer here"
        folder = os.path.join(os.fspath(name_or_path), options.get("subfolder") or "")
        if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f))
                                             for f in _TOKENIZER_FILES):
            # transformers' own first line here is "Couldn't instantiate the backend tokenizer
            # from one of:"
            raise ModelLoadError(
                f"cannot load the tokenizer of {str(name_or_path)!r}: the directory has no "
                f"{' or '.join(_TOKENIZER_FILES)} (save the tokenizer there with "
                "tokenizer.save_pretrained(dir))") from None
        raise ModelLoadError(f"cannot load the tokenizer of {str(name_or_path)!r}: "
                             f"{first_line(exc)}") from None


def torch_dtype(dtype, device):
    """What ``from_pretrained`` is given for one of :data:`DTYPES` (or a ``torch.dtype``) on
    ``device``: ``"auto"`` (the checkpoint's dtype) on GPU, float32 on CPU for ``"auto"``."""
    import torch

    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def load_model(name_or_path, *, device=None, dtype="auto", tokenizer: bool = True):
    """``(model, tokenizer or None)``: the causal LM in eval mode on ``device`` (see
    :func:`parse_device`; None: cuda when available, else cpu), or :class:`ModelLoadError`.

    ``dtype``: one of :data:`DTYPES` or a ``torch.dtype`` (``"auto"``: the checkpoint's dtype on
    GPU, float32 on CPU).
    """
    try:
        device = parse_device(device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    check_dtype(dtype)
    transformers = _transformers("loading a model by name")
    check_model_dir(name_or_path)
    dtype = torch_dtype(dtype, device)
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
