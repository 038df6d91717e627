"""sapwood: size, build, grow, train and serve large transformers."""

from sapwood.config import load_config
from sapwood.errors import ConfigError, SapwoodError
from sapwood.model import load

__all__ = ["ConfigError", "SapwoodError", "load", "load_config"]
__version__ = "0.1.0"
