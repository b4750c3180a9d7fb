"""``pplfast eval``: lm-evaluation-harness's command line with the ``pplfast`` model registered.

Every argument goes to lm-eval (0.4.10 or later, the first with sub-commands) unchanged
(``pplfast eval --model_args pretrained=DIR --tasks wikitext``); ``--model pplfast`` is added
when no ``--model`` is given, and ``run`` when no lm-eval sub-command is named. A local model
directory that does not exist or holds no saved model is reported in one line, as ``pplfast
score`` reports it, before lm-eval starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import List, Optional

from ._optional import require
from ._models import ModelLoadError, check_model_dir

_SUBCOMMANDS = ("run", "ls", "validate")
_MODEL_FLAGS = ("--model", "-M")
_MODEL_ARGS_FLAGS = ("--model_args", "-a")
_CHECKED_MODELS = ("pplfast", "hf", "hf-auto", "huggingface")  # pretrained= is a transformers model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="...",
                        help="lm-eval arguments, e.g. --model_args pretrained=DIR --tasks wikitext "
                             "(see `lm-eval run --help`)")


def _option_values(argv: List[str], flags) -> List[List[str]]:
    """The values after each occurrence of ``flags`` (``--flag v1 v2`` or ``--flag=v``)."""
    found = []
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag:
                values = []
                for value in argv[i + 1:]:
                    if value.startswith("-"):
                        break
                    values.append(value)
                found.append(values)
            elif flag.startswith("--") and arg.startswith(flag + "="):
                found.append([arg[len(flag) + 1:]])
    return found


def lm_eval_argv(args) -> list:
    argv = list(args)
    if not argv or argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    if argv[0] == "run" and not _option_values(argv, _MODEL_FLAGS):
        argv = ["run", "--model", "pplfast", *argv[1:]]
    return argv


def pretrained_of(argv: List[str]) -> Optional[str]:
    """The ``pretrained=`` of ``--model_args`` (``k=v,k=v``, ``k=v k=v`` or a JSON object; the
    last one given wins, as in lm-eval), or None."""
    pretrained = None
    for values in _option_values(argv, _MODEL_ARGS_FLAGS):
        for value in values:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                pretrained = parsed.get("pretrained", pretrained)
                continue
            for item in value.split(","):
                key, _, val = item.partition("=")
                if key.strip() == "pretrained" and val:
                    pretrained = val
    return pretrained if isinstance(pretrained, str) else None


def check_model(argv: List[str]) -> None:
    """:class:`ModelLoadError` when ``pretrained=`` names a local directory that is missing or holds
    no saved model (for the Hugging Face models; hub ids are left to transformers)."""
    if argv[:1] != ["run"]:
        return
    models = _option_values(argv, _MODEL_FLAGS)
    model = models[-1][0] if models and models[-1] else "pplfast"
    pretrained = pretrained_of(argv)
    if model in _CHECKED_MODELS and pretrained is not None:
        check_model_dir(pretrained)


def run(args) -> int:
    argv = lm_eval_argv(args.lm_eval_args)
    try:
        check_model(argv)
        require("lm_eval", extra="lm-eval", feature="pplfast eval")
        if importlib.util.find_spec("lm_eval._cli") is None:
            raise ImportError('pplfast eval needs lm-eval 0.4.10 or later: pip install -U '
                              '"pplfast[lm-eval]"')
        transformers = require("transformers", extra="lm-eval", feature="pplfast eval")
        import pplfast.lm_eval  # noqa: F401  (registers the model)
        from lm_eval.__main__ import cli_evaluate
    except (ImportError, ModelLoadError) as exc:
        print(f"pplfast eval: error: {exc}", file=sys.stderr)
        return 1
    # as pplfast score: transformers' loading bars and notices would interleave with lm-eval's
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
