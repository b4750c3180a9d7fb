"""Triton kernels, one op per file, each with its launcher. Installed as ``pplfast.kernels``."""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a checkout's root is on sys.path (``python -m pytest``
    # or ``python -m pplfast`` run there). That name belongs to an unrelated distribution which
    # transformers imports when it is installed; load that one in our place, or fail as if this
    # folder were not there, so that a checkout never shadows it.
    import importlib.machinery
    import importlib.util
    import pathlib
    import sys

    _checkout = pathlib.Path(__file__).resolve().parents[1]
    _path = [p for p in sys.path
             if isinstance(p, str) and pathlib.Path(p or ".").resolve() != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
