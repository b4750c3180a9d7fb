"""The ``pplfast`` command line: :mod:`pplfast.cli.main` (the command table and the entry
point), one module per command, and :mod:`pplfast.cli._common`, the toolkit they share.
``pplfast.cli.main`` (the function) is the console script."""
from .main import main

__all__ = ["main"]
