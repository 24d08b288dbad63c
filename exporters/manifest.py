"""A bundle's manifest: its name and schema, sha256 of every file, the archive, and the integrity check."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from pathlib import Path

from edgesvd.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file of a bundle folder except the manifest."""
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(bundle: Path) -> dict:
    """The manifest of a bundle folder; BundleError when absent or not JSON."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {bundle}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"malformed {path}: {exc}") from exc


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def record_file(bundle: Path, rel: str) -> None:
    """Add (or refresh) one file's sha256 in a bundle whose manifest already has a file table,
    and rewrite the bundle's .tar.gz beside it when there is one."""
    manifest = read_manifest(bundle)
    if "files" not in manifest:
        return  # the bundle is still being assembled; pack writes the file table at the end
    path = bundle / rel
    manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_manifest(bundle, manifest)
    tarball = bundle.with_name(bundle.name + ".tar.gz")
    if tarball.is_file():
        write_tarball(bundle, tarball, bundle.name)


def write_tarball(folder: Path, tarball: Path, arcname: str) -> None:
    """Write the .tar.gz through a temporary name so a failure leaves no partial archive."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{tarball.name}.", dir=tarball.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp_name, "w:gz") as tar:
            tar.add(folder, arcname=arcname)
        os.replace(tmp_name, tarball)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def check_bundle(bundle: str | os.PathLike) -> dict:
    """Re-verify every file's sha256 against manifest.json (a folder or a .tar.gz); BundleError on
    any missing, changed or unlisted file. Returns the manifest."""
    bundle = Path(bundle)
    if not bundle.exists():
        raise BundleError(f"bundle does not exist: {bundle}")
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="edgesvd-check-") as tmp:
            try:
                with tarfile.open(bundle, "r:gz") as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BundleError(f"{bundle} is not a readable .tar.gz: {exc}") from exc
            roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
            if len(roots) != 1:
                raise BundleError(f"{bundle} must hold exactly one bundle folder")
            return check_bundle(roots[0])
    manifest = read_manifest(bundle)
    try:
        files = manifest["files"]
    except (KeyError, TypeError) as exc:
        raise BundleError(f"malformed {bundle / MANIFEST}: {exc}") from exc
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise BundleError(f"{bundle} uses manifest schema {manifest['schema_version']}; this edgesvd reads up to {SCHEMA_VERSION}")
    problems = []
    for rel, entry in files.items():
        p = bundle / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel} was modified (sha256 differs)")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems += [f"{rel} is not in the manifest" for rel in sorted(present - set(files))]
    if problems:
        raise BundleError(f"bundle check failed for {bundle}: " + "; ".join(problems[:5])
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return manifest
