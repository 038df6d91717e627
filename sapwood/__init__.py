"""sapwood: size, build, grow, train and serve large transformers."""

from typing import Any

from sapwood.errors import ConfigError, SapwoodError

__all__ = ["ConfigError", "SapwoodError", "load", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``sapwood.load`` imports torch and ``sapwood.load_config`` pydantic only when used, so commands start
    fast (and ``sapwood`` takes over Ctrl-C early, see :mod:`sapwood.cli`)."""
    if name == "load":
        from sapwood.model import load

        return load
    if name == "load_config":
        from sapwood.config import load_config

        return load_config
    raise AttributeError(f"module 'sapwood' has no attribute {name!r}")
