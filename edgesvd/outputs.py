"""Output folders: refused when they exist (unless forced), written into a temporary sibling, renamed on success."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output folder unless `force`; called before any heavy work."""
    if out.exists() and not force:
        raise OutputExistsError(f"output folder exists: {out} (use --force to replace it)")


@contextmanager
def atomic_output_dir(out: Path, force: bool):
    """Yield a temporary sibling folder; it replaces `out` only if the block succeeds.

    The folder is named `.<out>.<pid>.<random>`: a run killed with SIGKILL cannot clean up after
    itself, so the next run for the same output removes the folders of processes that no longer
    exist (a live process's folder, e.g. a concurrent run, is left alone).
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `.<out>.<pid>.*` siblings whose process is gone (left by a killed run)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        pid = path.name[len(out.name) + 2 :].split(".", 1)[0]
        if not (path.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (PermissionError, OverflowError):  # alive under another user / not a pid: leave it
            pass


