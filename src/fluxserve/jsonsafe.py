"""JSON the server takes in and gives out: no unpaired surrogates, no U+0000, finite numbers, bounded nesting.

Python's JSON decoder accepts text that nothing downstream can hold: ``"\\ud800"`` (an unpaired UTF-16
surrogate) becomes a string no UTF-8 encoder takes, so every answer that includes it fails; ``"\\u0000"`` is a
character PostgreSQL text cannot hold, and a JSON value holding it breaks PostgreSQL's JSON operators for the
whole row; ``NaN`` and ``1e400`` are no JSON at all once written back; and a body nested 100,000 levels deep
makes the decoder recurse until ``RecursionError``.

- ``decode(raw, max_depth)`` parses a request body and refuses all of these with a ``BadJson`` that names the
  path of the offending value (``("input", "prompt")``, ``("loras", 0, "path")``); each dialect renders the
  path in its own error shape. ``check(value, max_depth)`` does the same for a parsed object (form fields).
- ``scrub(value)`` / ``storable(text)`` make what older rows already hold, or what a worker's failure message
  quotes, safe to store and to answer with: each bad character becomes U+FFFD.

Every function here is pure (no I/O, no globals): callable on the event loop or from any thread.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

DEFAULT_MAX_DEPTH = 32  # FLUX.2 inputs nest 3 levels (loras[i].path); 32 leaves room for any caller's extras
REPLACEMENT = "\ufffd"
Path = tuple[str | int, ...]

_BAD = re.compile("[\x00\ud800-\udfff]")  # NUL or a surrogate (a str holds pairs as one code point each)
_SPACE = re.compile(r"[ \t\n\r]*")


class BadJson(ValueError):
    """A body the server refuses: ``path`` to the value (empty: the whole body), ``message`` without the field
    name, ``kind`` (``json_invalid``, ``json_too_deep``, ``string_unicode``, ``finite_number``)."""

    def __init__(self, path: Path, message: str, kind: str):
        super().__init__(message)
        self.path, self.message, self.kind = tuple(path), message, kind


def bad_character(text: str) -> str | None:
    """Why ``text`` cannot be stored or answered with (its first NUL or unpaired surrogate), or None."""
    if text.isascii():
        return "must not contain U+0000 (NUL)" if "\x00" in text else None
    match = _BAD.search(text)
    if match is None:
        return None
    if match.group() == "\x00":
        return "must not contain U+0000 (NUL)"
    return f"holds an unpaired UTF-16 surrogate (U+{ord(match.group()):04X}): it is not Unicode text"


def printable(part: str | int) -> str | int:
    """A path part (a key) as it can be named in an answer: bad characters as ``\\uXXXX`` escapes."""
    if isinstance(part, int) or bad_character(part) is None:
        return part
    return _BAD.sub(lambda m: f"\\u{ord(m.group()):04x}", part)


def check(value: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise ``BadJson`` for a string (or key) with a NUL or an unpaired surrogate, a number that is not
    finite, or a container nested deeper than ``max_depth`` (the top level is 1): one of them when there are
    several. Walks without recursion."""
    stack: list[tuple[Any, Path, int]] = [(value, (), 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if (why := bad_character(item)) is not None:
                raise BadJson(path, why, "string_unicode")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BadJson(path, "must be a finite number", "finite_number")
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise BadJson(path, f"is nested too deeply: at most {max_depth} levels", "json_too_deep")
            if isinstance(item, dict):
                for key, member in item.items():
                    if (why := bad_character(key)) is not None:
                        raise BadJson((*path, printable(key)), f"names a field that {why}", "string_unicode")
                    stack.append((member, (*path, key), depth + 1))
            else:
                stack.extend((member, (*path, index), depth + 1) for index, member in enumerate(item))


def decode(raw: bytes | str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse a JSON body (UTF-8, -16 or -32 bytes, or text) and ``check`` it; ``BadJson`` otherwise. A body
    nested past what the decoder can recurse through is refused too, naming the path to where it passes
    ``max_depth``. A large UTF-8 body that plainly holds none of what ``check`` looks for (``_plainly_fine``:
    scans of the bytes in C) is not walked: a 30 MB body costs about its parse again, not a walk in Python
    over every value (five times that)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
        raise BadJson(_deep_path(text, max_depth), f"is nested too deeply: at most {max_depth} levels",
                      "json_too_deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise BadJson((), f"Invalid JSON: {exc}", "json_invalid") from None
    if not _plainly_fine(raw, max_depth):
        check(value, max_depth)
    return value


_PLAIN_FROM = 64 * 1024  # bytes: below it, a walk costs less than the scans
_BAD_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")  # may decode to a NUL or a surrogate
_SURROGATE_BYTES = re.compile(rb"\xed[\xa0-\xbf]")  # a surrogate encoded as UTF-8 would be
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def _plainly_fine(raw: bytes | str, max_depth: int) -> bool:
    """True when a large body that decoded cannot hold what ``check`` refuses: UTF-8 without an escape or
    bytes that may decode to a NUL or a surrogate; outside its strings no NaN, Infinity, exponent or run of
    300 digits (what may decode to a number that is not finite); and its brackets nest at most ``max_depth``
    deep (innermost pairs peeled off once per level). A body with escaped quotes is walked instead (its
    strings cannot be cut out by quotes). False alarms only cost the walk."""
    if isinstance(raw, str) or len(raw) < _PLAIN_FROM or json.detect_encoding(raw) != "utf-8":
        return False
    if (b"\\u" in raw and _BAD_ESCAPE.search(raw)) or _SURROGATE_BYTES.search(raw) or b'\\"' in raw:
        return False
    outside = b"".join(raw.split(b'"')[::2])  # without escaped quotes, quotes pair up around the strings
    words = outside.replace(b"true", b"").replace(b"false", b"").replace(b"null", b"")
    if any(letter in words for letter in (b"N", b"I", b"e", b"E")) or b"0" * 300 in words.translate(
            _DIGITS_AS_ZERO):
        return False
    brackets = outside.translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return True
        brackets = _INNERMOST.sub(b"", brackets)  # one level: the pairs innermost before this pass
    return not brackets


def _deep_path(text: str, max_depth: int) -> Path:
    """The path to the container that passes ``max_depth`` in a document too deep to decode: each level's
    members are decoded one by one (in C) and the one that is too deep is entered. Only called once
    decoding failed; costs at most ``max_depth`` passes over the text. Where the text stops making sense, the
    path so far."""
    path: list[str | int] = []
    try:
        _descend(text, max_depth, path)
    except (ValueError, IndexError):  # not JSON past this point: the path found so far
        pass
    return tuple(path)


def _descend(text: str, max_depth: int, path: list[str | int]) -> None:
    decoder = json.JSONDecoder()
    index = _SPACE.match(text, 0).end()
    for _ in range(max_depth):
        opening = text[index:index + 1]
        if opening not in ("{", "["):
            return
        index = _SPACE.match(text, index + 1).end()
        position = 0
        while True:
            member: str | int = position
            if opening == "{":
                if text[index:index + 1] != '"':
                    return
                member, index = json.decoder.scanstring(text, index + 1)
                index = _SPACE.match(text, _SPACE.match(text, index).end() + 1).end()  # past ':'
            try:
                _, end = decoder.raw_decode(text, index)
            except RecursionError:
                path.append(printable(member))
                break  # enter this member
            index = _SPACE.match(text, end).end()
            if text[index:index + 1] != ",":
                return
            index = _SPACE.match(text, index + 1).end()
            position += 1


def storable(text: str | None) -> str | None:
    """``text`` with every NUL and unpaired surrogate replaced by U+FFFD: what any database text column and
    any UTF-8 answer can hold (a failure message quoting a caller's bad URL, a log line)."""
    if text is None or bad_character(text) is None:
        return text
    return _BAD.sub(REPLACEMENT, text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))


def scrub(value: Any) -> Any:
    """``value`` (parsed JSON) with every string and key made ``storable``; the same object when nothing
    needed it (the common case costs one walk and no copy). Non-finite numbers become None."""
    try:
        check(value, max_depth=10**9)
    except BadJson:
        return _scrubbed(value)
    return value


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {storable(key): _scrubbed(member) for key, member in value.items()}
    if isinstance(value, list):
        return [_scrubbed(member) for member in value]
    return value


def dotted(path: Path, indexes: str = "[]") -> str:
    """A path as one field name: ``input.images.0`` (``indexes="."``, Replicate's) or ``images[0].url`` (the
    default, OpenAI's)."""
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f".{part}" if indexes == "." else f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name
