"""``python -m pplfast``: the ``pplfast`` command line (see :mod:`pplfast.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
