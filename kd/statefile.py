"""One reader for the state files that other processes (or people) write next to the runs.

`status.json`, `progress.jsonl`, `model_card.json`, `config.json`, the job lock and `active.json` are
written by a training process, by hand, or half-written by a crash. Read through here, anything
unexpected in them (not UTF-8, not JSON, JSON of the wrong shape) becomes one `UnreadableState`
whose message is "unreadable: <file>, <why>", which a page can show in place of the content and a
command can print, instead of a KeyError or TypeError deep inside whoever used the value.

Shapes are checked with small callables (`object_with`, `list_of`, `mapping_of`, `nullable`) that
raise `ShapeError(why)`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
OPTIONAL_STR = (str, type(None))
OPTIONAL_DICT = (dict, type(None))

Check = Callable[..., None]  # check(value, what) raises ShapeError
_NO_DEFAULT = object()


class UnreadableState(ValueError):
    """A state file that cannot be used; str() is "unreadable: <file>, <why>"."""

    def __init__(self, path: str | Path, why: str):
        self.path, self.why = str(path), why
        super().__init__(f"unreadable: {path}, {why}")


class ShapeError(ValueError):
    """Why a decoded value does not have the shape its reader expects (a phrase, no file name)."""


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object",
               list: "a JSON list", type(None): "null"}


def _type_phrase(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    if int in types and float in types:  # "a number" covers both
        types = tuple(t for t in types if t is not int)
    names = [_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in types]
    return " or ".join(names)


def show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or value == value else "NaN"
    return text if len(text) <= 40 else text[:37] + "..."


def is_a(value: Any, types) -> bool:
    """isinstance, except that true/false never passes for a number (JSON keeps them apart)."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def expect(value: Any, types, what: str) -> None:
    """Raise ShapeError unless `value` is of `types`; `what` names it in the message."""
    if not is_a(value, types):
        raise ShapeError(f"{what} must be {_type_phrase(types)}, not {show(value)}")


def child(what: str, key: str) -> str:
    """How a message names a part: 'phases[0]', 'models.teacher.threshold'."""
    if what == "it":
        return f"'{key}'"
    inner = what[1:-1] if what.startswith("'") and what.endswith("'") else what
    return f"'{inner}{key}'" if key.startswith("[") else f"'{inner}.{key}'"


def object_with(required: dict[str, Any] | None = None, optional: dict[str, Any] | None = None) -> Check:
    """A check for a JSON object: `required` keys must be there with their types, `optional` ones
    only need their type when present. A type can be a tuple of types or a nested check."""
    required, optional = required or {}, optional or {}

    def check(value: Any, what: str = "it") -> None:
        expect(value, dict, what)
        for key in required:
            if key not in value:
                raise ShapeError(f"{what} has no {key!r}")
        for key, spec in {**optional, **required}.items():
            if key in value:
                conform(value[key], spec, child(what, key))

    return check


def list_of(spec) -> Check:
    """A check for a JSON list whose items all match `spec` (a type, tuple of types or check)."""

    def check(value: Any, what: str = "it") -> None:
        expect(value, list, what)
        for i, item in enumerate(value):
            conform(item, spec, child(what, f"[{i}]"))

    return check


def mapping_of(spec) -> Check:
    """A check for a JSON object with any keys, whose values all match `spec`."""

    def check(value: Any, what: str = "it") -> None:
        expect(value, dict, what)
        for key, item in value.items():
            conform(item, spec, child(what, key))

    return check


def nullable(spec) -> Check:
    """A check that accepts null or whatever matches `spec`."""

    def check(value: Any, what: str = "it") -> None:
        if value is not None:
            conform(value, spec, what)

    return check


def finite(low: float = -math.inf, high: float = math.inf, low_open: bool = False, or_null: bool = False) -> Check:
    """A check for a finite number in [low, high] ((low, high] with low_open; null too with or_null): JSON from
    Python may hold NaN and Infinity, and a NaN threshold or temperature turns every decision into one class."""

    def check(value: Any, what: str = "it") -> None:
        expect(value, OPTIONAL_NUMBER if or_null else NUMBER, what)
        if value is None:
            return
        if not math.isfinite(value):
            raise ShapeError(f"{what} must be a finite number, not {show(value)}")
        if value < low or value > high or (low_open and value == low):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ShapeError(f"{what} must be in {bounds}, not {show(value)}")

    return check


def one_of(choices) -> Check:
    """A check for a string from an allow-list (an architecture, a contrast normalisation)."""

    def check(value: Any, what: str = "it") -> None:
        expect(value, str, what)
        if value not in choices:
            raise ShapeError(f"{what} must be one of {', '.join(map(repr, choices))}, not {show(value)}")

    return check


def conform(value: Any, spec, what: str = "it") -> None:
    """Raise ShapeError unless `value` matches `spec`: a type, a tuple of types, or a check."""
    if isinstance(spec, (type, tuple)):
        expect(value, spec, what)
    else:
        spec(value, what)


def _decode(data: bytes) -> Any:
    """JSON from bytes; ShapeError with a person's reason when it is not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShapeError(f"not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ShapeError("it is empty")
    try:
        return json.loads(text)
    except RecursionError:  # [[[[...]]]] thousands deep: the decoder's stack, not the machine's, ran out
        raise ShapeError("not usable JSON (nested too deeply)") from None
    except ValueError as e:
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        raise ShapeError(f"not valid JSON ({getattr(e, 'msg', e)}{where})") from None


def read_json(path: str | Path, check: Check | None = None, default: Any = _NO_DEFAULT) -> Any:
    """The JSON value in `path`, checked by `check`.

    A missing file returns `default` when one is given; anything else that is wrong (missing without a
    default, unreadable, not JSON, wrong shape) raises UnreadableState."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if default is not _NO_DEFAULT:
            return default
        raise UnreadableState(path, "it does not exist") from None
    except OSError as e:
        raise UnreadableState(path, e.strerror or str(e)) from None
    try:
        value = _decode(data)
        if check is not None:
            conform(value, check)
    except ShapeError as e:
        raise UnreadableState(path, str(e)) from None
    except RecursionError:  # decodable, but too deep for the shape check's recursion
        raise UnreadableState(path, "not usable JSON (nested too deeply)") from None
    return value


def read_json_lines(path: str | Path, check: Check | None = None) -> tuple[list, UnreadableState | None]:
    """The records of a JSON-lines file that pass `check`, and what was wrong with the others.

    Lines that are not JSON or fail the check are left out and summarised in one UnreadableState
    (None when every line was fine); a missing file is no records. A last line without its newline
    is a write in progress: kept when it already parses, otherwise ignored without complaint."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as e:
        return [], UnreadableState(path, e.strerror or str(e))
    lines = data.split(b"\n")
    records, bad, seen = [], [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        complete = number < len(lines)  # followed by a newline
        try:
            value = _decode(line)
            if check is not None:
                try:
                    conform(value, check)
                except RecursionError:
                    raise ShapeError("not usable JSON (nested too deeply)") from None
        except ShapeError as e:
            if complete:
                seen += 1
                bad.append((number, str(e)))
            continue
        seen += 1
        records.append(value)
    if not bad:
        return records, None
    first_line, first_why = bad[0]
    return records, UnreadableState(path, f"{len(bad)} of {seen} lines left out (line {first_line}: {first_why})")
