"""``python -m pplfast.cli``: the ``pplfast`` command line (see :mod:`pplfast.cli.main`)."""
import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
