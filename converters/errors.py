"""Typed errors. Every jlora failure on bad input is a `JloraError` subclass.

Messages name the file, key path and shapes involved and say how to fix the
problem. Errors are raised before anything the caller passed in is modified.
"""


import re

MAX_WORD = 240
_LONG_WORD = re.compile(r"[^\s'\"]{%d,}" % (MAX_WORD + 1))
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shorten(match: re.Match) -> str:
    word = match.group(0)
    return f"{word[:120]}...({len(word) - 220} more characters)...{word[-100:]}"


def escape_control(text: str) -> str:
    """`text` with terminal control characters (escape sequences, NUL, ...) written as `\\x..` escapes;
    newlines and tabs stay."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def clean_message(message: str) -> str:
    """`message` with control characters escaped and any unbroken run over `MAX_WORD` characters
    (a hostile key name) cut to its head and tail."""
    return _LONG_WORD.sub(_shorten, escape_control(message))


class JloraError(Exception):
    """Base class of every error jlora raises on bad input."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (clean_message(args[0]),)
        super().__init__(*args)


class LoraFileNotFoundError(JloraError, FileNotFoundError):
    """The LoRA file, directory or Hub file could not be found."""


class HubTimeoutError(LoraFileNotFoundError, TimeoutError):
    """The Hugging Face Hub did not answer in time (see `JLORA_HUB_TIMEOUT`)."""


class CorruptFileError(JloraError):
    """The file is not a readable safetensors file (truncated, bad header, bad offsets)."""


class ModelFileNotFoundError(JloraError, FileNotFoundError):
    """A model folder, config or weight file of a base checkpoint could not be found."""


class ComponentNotInFileError(ModelFileNotFoundError):
    """A single-file checkpoint does not hold the component asked for (a Flux file has no VAE, say)."""


class UnsupportedModelError(JloraError):
    """A checkpoint's config asks for an architecture or option the JAX model does not have."""


class UnsafeFileError(JloraError):
    """Reading the file would execute code (pickle) and the caller did not allow it."""


class UnsupportedFormatError(JloraError):
    """The tensors do not look like any LoRA format jlora reads, or look like several."""


class KeyMismatchError(JloraError):
    """LoRA keys name modules that the target params do not have (or are unknown)."""


class ShapeMismatchError(JloraError):
    """LoRA factors do not fit the weights they target (other architecture or size)."""


class InvalidAdapterError(JloraError):
    """A LoRA module is incomplete or inconsistent (missing factor, rank mismatch, bad alpha)."""


class UnsafeFusingError(JloraError):
    """`safe_fusing=True` found NaN or inf in a fused weight."""


class NamingSchemeError(JloraError):
    """No naming scheme fits the params tree, or a path cannot be named."""


class CheckpointError(JloraError):
    """A training checkpoint cannot be written or read as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or not the requested step) in the checkpoint directory."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint's files are truncated, missing or unreadable."""


class CheckpointLockedError(CheckpointError):
    """Another process is writing checkpoints into the same directory."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not have the structure or shapes of the restore target."""


class UnsupportedModuleError(JloraError, NotImplementedError):
    """A module cannot run a LoRA unmerged per sample (scanned layers, grouped convs, other module types)."""


__all__ = [
    "JloraError",
    "LoraFileNotFoundError",
    "HubTimeoutError",
    "CorruptFileError",
    "ModelFileNotFoundError",
    "ComponentNotInFileError",
    "UnsupportedModelError",
    "UnsafeFileError",
    "UnsupportedFormatError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "InvalidAdapterError",
    "UnsafeFusingError",
    "NamingSchemeError",
    "UnsupportedModuleError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "CheckpointCorruptError",
    "CheckpointLockedError",
]
