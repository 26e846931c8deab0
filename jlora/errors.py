"""Typed errors (defined in `converters.errors`, which jlora builds on)."""

from converters.errors import *  # noqa: F401,F403
from converters.errors import __all__  # noqa: F401
