"""The package's version, in a module of its own: what a checkpoint, an export and --version record, importable
by any module without importing the package's API (``tl_ray/__init__.py``) from below it."""

__version__ = "0.1.0"
