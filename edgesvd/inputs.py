"""Input files: regular files only, read with a size cap, as UTF-8 text, JSON or TOML, with one-line errors.

Everything edgesvd reads from a path the user gave (or from a folder it did not write this run)
goes through here, so that a FIFO, a device or a link never blocks or leaks, a wrong encoding
or a wrong JSON shape is one `error:` line that names the file, and nothing is read whole
that must not be.
"""

from __future__ import annotations

import codecs
import errno
import json
import math
import os
import stat
import tomllib
from pathlib import Path
from typing import BinaryIO

from .errors import EdgesvdError, InputFileError

_UTF8_BOM = codecs.BOM_UTF8


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words ('a folder', 'a named pipe (FIFO)', …)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def open_regular(path: str | os.PathLike, what: str = "file", follow_symlinks: bool = True,
                 error: type[EdgesvdError] = InputFileError) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file; `error` otherwise.

    A FIFO is refused without blocking on it (opened non-blocking, then fstat'ed), a device without
    reading it; with `follow_symlinks=False` a symbolic link is refused (O_NOFOLLOW, so a link
    swapped in between the check and the open is refused too).
    """
    path = Path(path)
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{what} does not exist: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {path} is a symbolic link, not a regular file") from None
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise error(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int | None = None,
               follow_symlinks: bool = True, error: type[EdgesvdError] = InputFileError) -> bytes:
    """The bytes of a regular file, at most `limit` of them."""
    with open_regular(path, what, follow_symlinks, error) as f:
        try:
            return f.read() if limit is None else f.read(limit)
        except OSError as exc:
            raise error(f"cannot read {what} {path}: {exc.strerror}") from None


def decode_utf8(data: bytes, where: str, complete: bool = True,
                error: type[EdgesvdError] = InputFileError) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped). Text with NUL bytes or bytes that
    are not UTF-8 is refused: it is binary, UTF-16 or another encoding, and decoding it with
    replacement characters would silently feed noise to the model. `complete=False`: `data` is a
    prefix, so a multi-byte character cut at its end is dropped instead of refused."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise error(f"{where} is not UTF-8 text: it holds NUL bytes (offset {nul}), as binary files and "
                    "UTF-16 text do")
    try:
        return codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=complete)
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    "convert it, e.g. with iconv -t UTF-8") from None


def read_text(path: str | os.PathLike, what: str = "file", limit: int | None = None,
              follow_symlinks: bool = True, error: type[EdgesvdError] = InputFileError) -> str:
    """A regular file as UTF-8 text; with `limit`, at most its first `limit` bytes."""
    data = read_bytes(path, what, limit, follow_symlinks, error)
    return decode_utf8(data, f"{what} {path}", complete=limit is None or len(data) < limit, error=error)


def read_json(path: str | os.PathLike, what: str = "file", schema: dict | None = None,
              follow_symlinks: bool = True, error: type[EdgesvdError] = InputFileError):
    """A regular UTF-8 file parsed as JSON and, with `schema`, validated against it."""
    text = read_text(path, what, follow_symlinks=follow_symlinks, error=error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if schema is not None:
        validate(data, schema, f"{what} {path}", error)
    return data


def read_toml(path: str | os.PathLike, what: str = "file", error: type[EdgesvdError] = InputFileError) -> dict:
    """A regular UTF-8 file parsed as TOML."""
    text = read_text(path, what, error=error)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def _json_type(value) -> str:
    return next(name for t, name in _JSON_TYPES if isinstance(value, t))


def validate(data, schema: dict, where: str, error: type[EdgesvdError] = InputFileError) -> None:
    """Validate parsed JSON/TOML against a JSON schema; the first error, as one line naming the key."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if not errors:
        return
    err = max(errors, key=lambda e: len(e.absolute_path))  # the deepest names the offending key
    key = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "required":
        missing = err.message.split("'")[1]
        raise error(f"{where}: key '{f'{key}.{missing}' if key else missing}' is required")
    if err.validator == "additionalProperties":
        raise error(f"{where}: {'in ' + key + ': ' if key else ''}{err.message}")
    if err.validator == "type":
        wanted = err.validator_value if isinstance(err.validator_value, str) else " or ".join(err.validator_value)
        what = f"key '{key}'" if key else "the document"
        raise error(f"{where}: {what} must be of type {wanted}, not {_json_type(err.instance)}")
    message = err.message if len(err.message) <= 200 else err.message[:200] + "…"
    raise error(f"{where}: key '{key}': {message}" if key else f"{where}: {message}")


def require_finite(data, where: str, error: type[EdgesvdError] = InputFileError, _key: str = "") -> None:
    """Refuse NaN and ±inf anywhere in parsed TOML/JSON (they pass numeric schema bounds unnoticed)."""
    if isinstance(data, float) and not math.isfinite(data):
        raise error(f"{where}: key '{_key}' is {data}; numbers must be finite")
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        require_finite(v, where, error, f"{_key}.{k}" if _key else str(k))
