"""Typed errors raised where a problem is detected; the CLI turns each into one `error: …` line."""

from __future__ import annotations


class EdgesvdError(Exception):
    """Base class. `exit_code` is what the CLI exits with (2: bad input or usage; 1: a check failed)."""

    exit_code = 2


class ModelLoadError(EdgesvdError):
    """The model path/id is missing, incomplete, unsafe (pickle-only) or of an unsupported family."""


class CalibrationError(EdgesvdError):
    """The calibration source is missing, unreadable, or yields no text."""


class ConfigError(EdgesvdError):
    """An option or configuration value is out of range or inconsistent."""


class NoTargetError(EdgesvdError):
    """No Linear layer matched the targeting rules."""


class CheckpointError(EdgesvdError):
    """A compressed checkpoint is missing files, corrupt, or inconsistent with its config."""


class InputFileError(EdgesvdError):
    """An input file is missing, not a regular file (a link where none may be, a FIFO, a device), not
    UTF-8 text, or not the JSON/TOML document it should be."""


class OutputError(EdgesvdError):
    """An output cannot be written: its place is not a writable folder, it overlaps an input, another
    edgesvd process is writing it, or a write failed (disk full, file-size limit)."""


class OutputExistsError(OutputError):
    """The output exists and overwriting was not allowed (or it is not what --force may replace)."""


class BudgetError(EdgesvdError):
    """A budget cannot be met (infeasible), or was missed after measurement."""


class DeviceError(EdgesvdError):
    """A requested device or execution provider is not available."""


class ExportError(EdgesvdError):
    """The ONNX export (or its post-processing: fp16, int8, pooling) failed or is not possible."""


class ParityError(EdgesvdError):
    """The exported model disagrees with the PyTorch model beyond the tolerances."""

    exit_code = 1


class FactorizationError(EdgesvdError):
    """A compressed layer is not two MatMuls of the checkpoint's rank in the graph (it was folded)."""

    exit_code = 1


class BundleError(EdgesvdError):
    """A bundle is incomplete, or a file's sha256 does not match its manifest."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    wrapping a library's multi-line error into edgesvd's one-line messages."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
