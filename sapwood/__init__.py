"""sapwood: size, build, grow, train and serve large transformers."""

from typing import Any

from sapwood.config import load_config
from sapwood.errors import ConfigError, SapwoodError

__all__ = ["ConfigError", "SapwoodError", "load", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``sapwood.load`` imports torch only when used, so commands like ``sapwood size`` start fast."""
    if name == "load":
        from sapwood.model import load

        return load
    raise AttributeError(f"module 'sapwood' has no attribute {name!r}")
