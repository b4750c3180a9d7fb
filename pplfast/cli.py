"""``pplfast`` console script: one sub-command per job, each defined in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "bench": ("pplfast.bench", "time pplfast against PyTorch baselines on this machine"),
    "score": ("pplfast.score", "perplexity of a Hugging Face causal LM on a text or JSONL file"),
    "score-corpus": ("pplfast.corpus_cli", "per-document perplexity of a corpus, streamed, resumable"),
    "filter": ("pplfast.corpus_cli", "keep the documents of a corpus inside a perplexity band"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pplfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
