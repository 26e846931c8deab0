"""PEFT's `rank_pattern` / `alpha_pattern` lookup, in time linear in the module name.

PEFT takes, for a module name, the first pattern key (in the mapping's order) that matches
`(.*\\.)?(KEY)$`. Keys that come from files are untrusted, so here:

* keys made only of name characters and dots (`down_blocks.1.attentions.0.to_q`, all real files
  seen) match a dotted suffix of the module name: found by dictionary lookups over the name's
  suffixes, not by trying every key;
* other keys are regular expressions run with RE2 (`google-re2`), whose matching time is linear
  in the name, so no key can make a lookup hang;
* at most `MAX_PATTERNS` keys of at most `MAX_PATTERN_LENGTH` characters, and at most
  `MAX_REGEX_PATTERNS` regular expressions; past that, or for a key RE2 cannot compile,
  `PatternError` names the field and the key.
"""

from __future__ import annotations

import re
from typing import Mapping

from converters.errors import InvalidAdapterError

MAX_PATTERNS = 50_000
MAX_PATTERN_LENGTH = 1_000
MAX_REGEX_PATTERNS = 1_000

_LITERAL = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


class PatternError(InvalidAdapterError):
    """A `rank_pattern` / `alpha_pattern` key is too long, too many, or not a pattern RE2 can run."""


def _re2_compile(pattern: str):
    import re2

    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


class Matcher:
    """The keys of one pattern mapping, ready for `first(module)`."""

    def __init__(self, keys, field: str, where: str):
        keys = list(keys)
        if len(keys) > MAX_PATTERNS:
            raise PatternError(f"{where}: {field} has {len(keys)} keys; at most {MAX_PATTERNS} are read.")
        self.keys = keys
        self.literal: dict[tuple[str, ...], int] = {}
        self.regex: list[tuple[int, object]] = []
        for i, key in enumerate(keys):
            if not isinstance(key, str):
                raise PatternError(f"{where}: {field} key {key!r} is not a string.")
            if len(key) > MAX_PATTERN_LENGTH:
                raise PatternError(f"{where}: {field} key {key[:60]!r}... is {len(key)} characters long; at most "
                                   f"{MAX_PATTERN_LENGTH} are read.")
            if _LITERAL.fullmatch(key):
                self.literal.setdefault(tuple(key.split(".")), i)
                continue
            if len(self.regex) >= MAX_REGEX_PATTERNS:
                raise PatternError(f"{where}: {field} has more than {MAX_REGEX_PATTERNS} regular-expression keys.")
            try:
                compiled = _re2_compile(rf"(.*\.)?({key})$")
            except ImportError:
                raise PatternError(f"{where}: {field} key {key!r} is a regular expression; matching it needs the "
                                   "google-re2 package (pip install google-re2).") from None
            except Exception as e:  # re2.error, TypeError
                raise PatternError(f"{where}: {field} key {key!r} is not a pattern RE2 can run ({e}).") from None
            self.regex.append((i, compiled))
        self.longest = max((len(k) for k in self.literal), default=0)

    def first(self, module: str) -> int | None:
        """Index of the first key matching `module`, or None."""
        parts = module.split(".")
        best = None
        for n in range(1, min(len(parts), self.longest) + 1):
            hit = self.literal.get(tuple(parts[-n:]))
            if hit is not None and (best is None or hit < best):
                best = hit
        for i, compiled in self.regex:
            if best is not None and i > best:
                break
            if compiled.match(module):
                best = i
                break
        return best


_CACHE: list[tuple[Mapping, Matcher]] = []


def matcher(pattern: Mapping, field: str, where: str) -> Matcher:
    """The `Matcher` of a pattern mapping (kept for the last few mappings, so a file's pattern is
    prepared once, not once per module)."""
    for held, m in _CACHE:
        if held is pattern:
            return m
    m = Matcher(pattern.keys(), field, where)
    _CACHE.append((pattern, m))
    del _CACHE[:-8]
    return m


def first_match(pattern: Mapping, module: str, field: str, where: str):
    """`(key, value)` of the first key of `pattern` matching `module` as PEFT matches it, or None."""
    m = matcher(pattern, field, where)
    i = m.first(module)
    if i is None:
        return None
    key = m.keys[i]
    return key, pattern[key]
