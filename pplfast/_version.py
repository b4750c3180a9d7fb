"""The package version, below every module (the commands report it)."""
__version__ = "0.1.0"
