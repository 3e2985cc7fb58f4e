"""The package version, in a module of its own: ``pyproject.toml`` and ``phivision --version`` read it without
importing the package."""

__version__ = "0.1.0"
