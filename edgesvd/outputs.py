"""Outputs: checked before any work, written into a marked temporary sibling, renamed into place only on success.

The promises, each kept here and nowhere else: an existing output is replaced only with `force`
(and only a folder by a folder, a file by a file); an output never is, contains or sits inside an
input, the current folder or the root; its place is proven writable before the work starts; two
processes writing one output never both succeed; a write that fails (disk full, `ulimit -f`)
is one line and leaves nothing; and a clean-up removes only what edgesvd itself marked.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, OutputExistsError

# Written inside every temporary output folder when it is created, and held under an exclusive
# lock (flock) while the process lives: a folder with this file whose lock can be taken belongs
# to a dead edgesvd run and may be removed; one without it is not ours and is never touched.
MARKER = ".edgesvd-writing"


def _check_place(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is the root, the current folder or one above it, or that overlaps an
    input (is it, lies inside it, or holds it): replacing it would delete what is being read."""
    absolute = Path(os.path.abspath(out))
    if absolute == Path(absolute.anchor):
        raise OutputError(f"output {out} is the root of the file system: give the name of a new folder")
    if absolute == Path.cwd() or absolute in Path.cwd().parents:
        raise OutputError(f"output {out} is the current folder or one above it: give the name of a new folder")
    resolved = absolute.resolve()
    for source in inputs:
        if source is None or not os.path.lexists(source):  # an alias or hub id names no folder here
            continue
        other = Path(source).resolve()
        if resolved == other or other in resolved.parents or resolved in other.parents:
            relation = "is" if resolved == other else "lies inside" if other in resolved.parents else "holds"
            raise OutputError(f"output {out} {relation} the input {source}: write it somewhere else")


def _require_writable(out: Path) -> None:
    """Prove, by creating and removing a folder there, that `out` can be created (as root,
    permission bits say nothing; a read-only mount or /sys says no only when tried)."""
    place = Path(os.path.abspath(out)).parent
    while not os.path.lexists(place):
        place = place.parent
    if not place.is_dir():
        raise OutputError(f"cannot write {out}: {place} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgesvd-probe-", dir=place))
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {place} is not writable ({exc.strerror})") from None


def _temporaries(out: Path) -> Iterator[tuple[Path, Path]]:
    """(folder, marker) of every marked temporary sibling of `out` (`.<name>.<pid>.<random>`)."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*"):
        marker = folder / MARKER
        try:
            if stat.S_ISDIR(folder.lstat().st_mode) and stat.S_ISREG(marker.lstat().st_mode):
                yield folder, marker
        except OSError:  # gone meanwhile, or no marker: not ours
            continue


def _sweep(out: Path) -> str | None:
    """Remove the temporaries of dead edgesvd runs for `out`; the pid of a live writer, if any."""
    live = None
    for folder, marker in _temporaries(out):
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live = os.read(fd, 200).decode("utf-8", "replace").rpartition("pid ")[2].strip() or "?"
                continue
            shutil.rmtree(folder, ignore_errors=True)  # its writer died (SIGKILL, power loss)
        finally:
            os.close(fd)
    return live


def check_output_dir(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Everything that can be known about an output folder before any work: see the module's docstring."""
    out = Path(out)
    _check_place(out, inputs)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{out} exists and is not a folder: --force replaces only an output folder "
                                "(remove it yourself, or choose another name)")
    if out.exists() and not force:
        raise OutputExistsError(f"output folder exists: {out} (use --force to replace it)")
    _require_writable(out)
    pid = _sweep(out)
    if pid is not None:
        raise OutputError(f"another edgesvd process (pid {pid}) is writing {out} now; wait for it or choose "
                          "another output")


def check_output_file(path: str | os.PathLike, force: bool) -> None:
    """The same for one output file (`--json FILE`, a profile, a bundle's .tar.gz)."""
    path = Path(path)
    _check_place(path, ())
    if path.is_dir() and not path.is_symlink():
        raise OutputExistsError(f"{path} is a folder: give the name of a file to write")
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"output file exists: {path} (use --force to replace it)")
    _require_writable(path)


def write_failed(out: Path, exc: OSError, tmp: Path | None = None) -> OutputError:
    """One line for a failed write (ENOSPC, EFBIG from `ulimit -f`, EACCES, EIO), naming the output
    (and the file, shown at its final place rather than in the temporary folder)."""
    name = str(exc.filename) if exc.filename else ""
    if tmp is not None and name.startswith(str(tmp)):
        name = str(out) + name[len(str(tmp)):]
    return OutputError(f"{out} not written: {exc.strerror or exc}" + (f" ({name})" if name else ""))


def _mark(folder: Path) -> int:
    """Write the marker into `folder` under an exclusive lock held until the returned fd is closed
    (the lock is taken before the marker gets its name, so no one sees it unlocked)."""
    fresh = folder / (MARKER + ".new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"edgesvd is writing this folder; it is removed when done. pid {os.getpid()}\n".encode())
    os.rename(fresh, folder / MARKER)
    return fd


def _publish(tmp: Path, out: Path, force: bool, scratch: Path) -> None:
    """Rename `tmp` to `out`. Without `force` the kernel refuses to replace a non-empty folder, so an
    output that another process finished meanwhile is never overwritten; with it, the old output
    is moved into `scratch` (removed afterwards) first."""
    try:
        os.rename(tmp, out)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise write_failed(out, exc) from None
    if not force:
        raise OutputExistsError(f"{out} was written by another process while this run worked: nothing was "
                                "replaced and this run's result was discarded (use --force to replace it)")
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder: --force replaces only an output folder")
    os.rename(out, scratch / "replaced")
    os.rename(tmp, out)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()):
    """Yield a folder to write; it becomes `out` only if the block succeeds.

    The folder lives in a marked, locked temporary sibling `.<out>.<pid>.<random>/` (see MARKER):
    failure, SIGTERM or an exception removes it; after SIGKILL the next run for `out` does.
    An OSError in the block (disk full, file-size limit) becomes one OutputError line.
    """
    out = Path(out)
    check_output_dir(out, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    except OSError as exc:
        raise write_failed(out, exc) from None
    lock = None
    try:
        lock = _mark(scratch)
        tmp = scratch / out.name
        tmp.mkdir()
        try:
            yield tmp
        except OSError as exc:
            raise write_failed(out, exc, tmp) from exc
        _publish(tmp, out, force, scratch)
    except OSError as exc:
        raise write_failed(out, exc) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if lock is not None:
            os.close(lock)


@contextmanager
def atomic_file(path: str | os.PathLike, force: bool):
    """Yield a temporary path beside `path` to write; it becomes `path` only if the block succeeds
    (without `force`, only if `path` still does not exist then)."""
    path = Path(path)
    check_output_file(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_failed(path, exc) from None
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open would
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with EEXIST if the file appeared meanwhile: never replaces it
    except FileExistsError:
        raise OutputExistsError(f"output file exists: {path} (written meanwhile by another process; "
                                "use --force to replace it)") from None
    except OSError as exc:
        raise write_failed(path, exc, tmp) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: str | os.PathLike, data: bytes | str, force: bool = False) -> Path:
    """Write one file atomically (see atomic_file); text is written as UTF-8."""
    path = Path(path)
    with atomic_file(path, force) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path
