"""``pplfast`` console script: one sub-command per job, each defined in its own module
(:data:`COMMANDS`; a new command is one line there).

Every sub-command module has ``add_arguments(parser)`` and ``run(args) -> int``. A user mistake is
reported by the module as one line on stderr with exit code 1; Ctrl-C anywhere ends with one
line and exit code 130, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# one line per command: name -> (module with add_arguments(parser) and run(args) -> int,
# one-line help)
COMMANDS = {
    "score": ("pplfast.cli.score", "perplexity of a Hugging Face causal LM on text files"),
    "compare": ("pplfast.cli.compare", "compare a model with a base model token by token "
                                       "(KL divergence, top-1 agreement, Δp)"),
    "score-corpus": ("pplfast.cli.score_corpus", "per-document perplexity of a corpus, streamed, "
                                                 "resumable"),
    "filter": ("pplfast.cli.filter", "keep the documents of a corpus inside a perplexity band"),
    "eval": ("pplfast.cli.eval", "lm-evaluation-harness with the pplfast model (all lm-eval "
                                 "options)"),
    "doctor": ("pplfast.cli.doctor", "check every backend on this machine against the float64 "
                                     "reference"),
    "bench": ("pplfast.cli.bench", "time pplfast against PyTorch (and GPU peers) on this machine"),
    "serve": ("pplfast.serve.cli", "a scoring server (OpenAI completions, SGLang generate, score)"),
}

DESCRIPTION = """\
Per-token negative log-likelihood and perplexity of language models, computed by fused kernels
that never build the vocabulary-sized probability tensor.

Run `pplfast COMMAND --help` for the options of one command.
"""

EPILOG = """\
examples:
  pplfast score --model gpt2 --input wiki.test.jsonl --window 1024 --stride 512
  pplfast bench --path logits --dtypes bf16
  pplfast compare --base ./model --model ./model-int8 --input wiki.test.jsonl --window 1024

Python API: pplfast.token_nll, pplfast.linear_token_nll, pplfast.Perplexity, pplfast.score_model,
pplfast.compare, pplfast.compare_models (see docs/ops.md, docs/models.md and docs/compare.md).
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-wrapped description and examples; show each option's default unless its
    help already states one, or it has none worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="pplfast", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pplfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text,
                                            formatter_class=_Formatter))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["eval"] and argv[1:2] not in (["-h"], ["--help"]):
            # every later argument belongs to lm-eval, options included
            module = importlib.import_module(COMMANDS["eval"][0])
            return module.run(argparse.Namespace(command="eval", lm_eval_args=argv[1:]))
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            # an unknown flag belongs to the sub-command: show its usage, not the top-level one
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        module = importlib.import_module(COMMANDS[args.command][0])
        return module.run(args)
    except KeyboardInterrupt:
        print("\npplfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
