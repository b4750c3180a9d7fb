"""Triton kernels, one op per file, each with its launcher. Installed as ``pplfast.kernels``."""
