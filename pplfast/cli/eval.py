"""``pplfast eval``: lm-evaluation-harness's command line with the ``pplfast`` model registered.

Every argument goes to lm-eval (0.4.10 or later, the first with sub-commands) unchanged
(``pplfast eval --model_args pretrained=DIR --tasks wikitext``); ``--model pplfast`` is added
when no ``--model`` is given, and ``run`` when no lm-eval sub-command is named. The arguments
are parsed by lm-eval's own parser; before lm-eval loads anything, a local model directory that
does not exist, holds no saved model or no tokenizer, a hub id that offline mode cannot give,
and a ``pplfast_backend=`` that is not pplfast's are each reported in one line (as ``pplfast
score`` reports a model), as is a model lm-eval then cannot load.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import List

from .._optional import require
from ..models.loading import ModelLoadError, check_model_dir, is_local, load_tokenizer
from ._common import report

_SUBCOMMANDS = ("run", "ls", "validate")
_MODEL_FLAGS = ("--model", "-M")
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


def check_model(args) -> None:
    """Before lm-eval loads anything, for lm-eval's parsed ``run`` arguments ``args``: a local
    ``pretrained=`` (or ``tokenizer=``) directory that is missing, holds no saved model or no
    loadable tokenizer, a hub id the offline hub cannot give (:mod:`pplfast.models.loading`), and for
    ``--model pplfast`` a ``pplfast_backend=`` that is not pplfast's: :class:`ModelLoadError` or
    ``ValueError``, one line. Hub ids are left to lm-eval and transformers."""
    if getattr(args, "command", None) != "run":
        return
    model = args.model or "hf"
    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    pretrained = model_args.get("pretrained")
    if model == "pplfast":
        from ..models.lm_eval import check_backends

        check_backends(model_args.get("pplfast_backend", "auto"),
                       model_args.get("backend", "default"))
    if model not in _CHECKED_MODELS or not isinstance(pretrained, str):
        return
    check_model_dir(pretrained)
    tokenizer = model_args.get("tokenizer")
    if isinstance(tokenizer, str) and tokenizer:
        check_model_dir(tokenizer, what="tokenizer")
    else:
        tokenizer = pretrained
    if is_local(tokenizer) and not model_args.get("gguf_file"):
        # HFLM's own AutoTokenizer call: its options, a local directory (no network)
        options = {"use_fast": model_args.get("use_fast_tokenizer", True)}
        for name in ("revision", "trust_remote_code", "subfolder", "add_bos_token"):
            if model_args.get(name) is not None:
                options[name] = model_args[name]
        load_tokenizer(tokenizer, **options)


def _lm_eval_cli():
    """lm-eval's command line (its parser and runner), or ImportError saying what to install."""
    require("lm_eval", extra="lm-eval", feature="pplfast eval")
    if importlib.util.find_spec("lm_eval._cli") is None:
        raise ImportError('pplfast eval needs lm-eval 0.4.10 or later: pip install -U '
                          '"pplfast[lm-eval]"')
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    return HarnessCLI, setup_logging


def _error(exc: BaseException) -> int:
    return report("eval", exc)


def run(args) -> int:
    argv = lm_eval_argv(args.lm_eval_args)
    try:
        harness_cli, setup_logging = _lm_eval_cli()
        transformers = require("transformers", extra="lm-eval", feature="pplfast eval")
    except ImportError as exc:
        return _error(exc)
    # lm-eval's cli_evaluate, with the model checked between parsing and running, so that the
    # arguments are read exactly as lm-eval reads them
    setup_logging()
    cli = harness_cli()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        parsed = cli.parse_args()
        try:
            check_model(parsed)
        except ValueError as exc:  # ModelLoadError included
            return _error(exc)
        from ..models import lm_eval  # noqa: F401  (registers the model)

        # as pplfast score: transformers' loading bars and notices would interleave with lm-eval's
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        cli.execute(parsed)
    except ModelLoadError as exc:  # the model itself, once lm-eval loads it (a hub id)
        return _error(exc)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
