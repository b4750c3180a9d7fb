"""Optional dependencies (extras in pyproject.toml), imported only where a feature needs them."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise ImportError naming the ``pplfast[extra]`` that provides it.

    Example: ``require("matplotlib", extra="plot", feature="--plot")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ImportError(f'{feature} needs {package}: pip install "pplfast[{extra}]"') from exc
