"""Format rule tables. Importing this package registers every format with the engine."""

from converters.formats import peft  # noqa: F401
