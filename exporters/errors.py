"""Typed errors of the exporters; the CLI prints each as one line and exits with its code."""

from __future__ import annotations

from edgesvd.errors import EdgesvdError


class ExportError(EdgesvdError):
    """The ONNX export (or its post-processing: fp16, int8, pooling) failed or is not possible."""


class FactorizationError(EdgesvdError):
    """A compressed layer is not two MatMuls of the checkpoint's rank in the graph (it was folded)."""

    exit_code = 1


class BundleError(EdgesvdError):
    """A bundle is incomplete, or a file's sha256 does not match its manifest."""

    exit_code = 1
