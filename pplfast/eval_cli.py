"""``pplfast eval``: lm-evaluation-harness's command line with the ``pplfast`` model registered.

Every argument goes to lm-eval unchanged (``pplfast eval --model_args pretrained=DIR --tasks
wikitext``); ``--model pplfast`` is added when no ``--model`` is given, and ``run`` when no
lm-eval sub-command is named.
"""
from __future__ import annotations

import argparse
import sys

from ._optional import require

_SUBCOMMANDS = ("run", "ls", "validate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="...",
                        help="lm-eval arguments, e.g. --model_args pretrained=DIR --tasks wikitext "
                             "(see `lm-eval run --help`)")


def lm_eval_argv(args) -> list:
    argv = list(args)
    if not argv or argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    if argv[0] == "run" and not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["run", "--model", "pplfast", *argv[1:]]
    return argv


def run(args) -> int:
    try:
        require("lm_eval", extra="lm-eval", feature="pplfast eval")
        import pplfast.lm_eval  # noqa: F401  (registers the model)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"pplfast eval: error: {exc}", file=sys.stderr)
        return 1
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(args.lm_eval_args)]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
