"""A bundle's manifest: its schema, the sha256 of every file, the archive, the exact integrity check, Ed25519 signatures.

What `pack --check` proves without a signature: the bundle (folder or .tar.gz) holds exactly the
regular files its manifest lists, at relative paths inside it, with those sha256 hashes and sizes,
and nothing else (no links, devices, pipes, unlisted files or folders, archive members outside the
one bundle folder). What it cannot prove without one: who wrote the manifest — anyone who changes a
file can write a new manifest with the new hashes. `pack --sign KEY` adds `manifest.sig`, an Ed25519
signature (RFC 8032) of manifest.json's bytes, which `pack --check --verify-key PUB` (or
`openssl pkeyutl -verify -rawin`) checks against the signer's public key.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from edgesvd.errors import BundleError, InputFileError, OutputError
from edgesvd.inputs import decode_utf8, kind_of, open_regular, read_bytes, validate
from edgesvd.outputs import atomic_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
UNLISTED = (MANIFEST, SIGNATURE)  # the only files of a bundle (at its top level) its manifest does not list
_MAX_MANIFEST_BYTES = 64 << 20
_CHUNK = 1 << 20

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_ENTRY = {"type": "object", "required": ["sha256", "bytes"],
          "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                         "bytes": {"type": "integer", "minimum": 0}}}
_LATENCY_STATS = {"type": "object", "required": ["p50_ms"],
                  "properties": {k: _NUMBER_OR_NULL for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s")}}

# The manifest as edgesvd writes it (schema_version 1). Sections the report reads are typed down to
# the fields it uses; other keys are allowed, so a reader of version 1 accepts what it does not use.
MANIFEST_SCHEMA: dict = {
    "type": "object",
    "required": ["schema_version", "model", "source", "compression"],
    "properties": {
        "schema_version": {"type": "integer", "minimum": 1},
        "created": {"type": "string"},
        "model": {"type": "object", "properties": {
            "family": {"type": "string"}, "model_type": {"type": "string"}, "task": {"type": "string"},
            "precision": {"type": "string"}, "opset": {"type": ["integer", "null"]}, "file": {"type": "string"}}},
        "source": {"type": "object", "properties": {"model": {"type": "string"}}},
        "checkpoint": {"type": "object"},
        "compression": {"type": "object", "required": ["method"], "properties": {
            "method": {"type": "string"}, "keep_requested": _NUMBER_OR_NULL, "keep_actual": _NUMBER_OR_NULL,
            "rank_multiple": {"type": "integer"},
            "ranks": {"type": "object", "additionalProperties": {"type": ["integer", "null"]}}}},
        "onnx_bytes": {"type": ["integer", "null"]},
        "parity": {"type": ["object", "null"], "properties": {
            "ok": {"type": "boolean"}, "precision": {"type": "string"},
            "providers": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "status": {"type": "string"}, "reason": {"type": ["string", "null"]}, "failures": _STRINGS,
                **{k: _NUMBER_OR_NULL for k in ("min_cosine", "top1", "generation", "embedding_cosine")}}}}}},
        "latency": {"type": ["object", "null"], "properties": {
            "shape": {"type": "object"},
            "models": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": _LATENCY_STATS}}},
            "comparisons": {"type": "array", "items": {"type": "object"}}}},
        "budgets": {"type": "object", "properties": {
            "values": {"type": ["object", "null"], "additionalProperties": _NUMBER_OR_NULL},
            "dense": {"type": ["object", "null"], "additionalProperties": _NUMBER_OR_NULL},
            "values_are": {"type": "string"}, "workload": {"type": ["object", "null"]},
            "plans": {"type": ["array", "null"], "items": {"type": "object"}},
            "quality_proxy": {"type": ["object", "null"], "additionalProperties": {"type": "number"}},
            "receipt": {"type": "object", "properties": {
                "budgets": {"type": "array", "items": {"type": "object", "required": ["key", "limit"], "properties": {
                    "key": {"type": "string"}, "limit": {"type": "number"}, "value": _NUMBER_OR_NULL,
                    "measured": _NUMBER_OR_NULL, "binding": {"type": "boolean"}}}},
                "notes": _STRINGS, "dense": {"type": "object"}, "totals": {"type": "object"},
                "importance_kept": _NUMBER_OR_NULL}}}},
        "quality": {"type": ["object", "null"]},
        "versions": {"type": "object"},
        "files": {"type": "object", "additionalProperties": _ENTRY},
    },
}
# A finished bundle's manifest lists its files (pack writes the table last).
_CHECKED_SCHEMA = {**MANIFEST_SCHEMA, "required": [*MANIFEST_SCHEMA["required"], "files"]}


def sha256_file(path: Path) -> str:
    """sha256 of a regular file (links are not followed)."""
    with open_regular(path, "file", follow_symlinks=False) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file of a bundle folder but the manifest and its
    signature; InputFileError on anything that is not a regular file or a folder."""
    table = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode) or rel in UNLISTED:
            continue
        if not stat.S_ISREG(mode):
            raise InputFileError(f"{path} is {kind_of(mode)}: a bundle holds only regular files")
        table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def parse_manifest(data: bytes, where: str, finished: bool = False, error: type = InputFileError) -> dict:
    """A manifest's bytes, decoded and validated against MANIFEST_SCHEMA (`finished`: with its file table)."""
    try:
        manifest = json.loads(decode_utf8(data, where, error=error))
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    validate(manifest, _CHECKED_SCHEMA if finished else MANIFEST_SCHEMA, where, error)
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise error(f"{where} uses manifest schema {manifest['schema_version']}; this edgesvd reads up to "
                    f"{SCHEMA_VERSION}")
    return manifest


def read_manifest(bundle: Path, finished: bool = False, error: type = InputFileError) -> dict:
    """The validated manifest of a bundle folder; `error` when it is absent, a link, or malformed."""
    path = Path(bundle) / MANIFEST
    if not os.path.lexists(path):
        raise error(f"no {MANIFEST} in {bundle}: not an edgesvd bundle")
    data = read_bytes(path, "bundle manifest", _MAX_MANIFEST_BYTES, follow_symlinks=False, error=error)
    return parse_manifest(data, f"{path}", finished, error)


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def refuse_signed(bundle: Path) -> None:
    """A signed bundle is not changed: a new manifest would no longer match its signature."""
    if os.path.lexists(Path(bundle) / SIGNATURE):
        raise OutputError(f"{bundle} is signed ({SIGNATURE}): changing it would break the signature; pack it "
                          "again (with --sign) instead")


def record_file(bundle: Path, rel: str) -> None:
    """Add (or refresh) one file's sha256 in a bundle whose manifest already has a file table,
    and rewrite the bundle's .tar.gz beside it when there is one. A signed bundle is refused."""
    manifest = read_manifest(bundle)
    if "files" not in manifest:
        return  # the bundle is still being assembled; pack writes the file table at the end
    refuse_signed(bundle)
    path = bundle / rel
    manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_manifest(bundle, manifest)
    tarball = bundle.with_name(bundle.name + ".tar.gz")
    if tarball.is_file():
        write_tarball(bundle, tarball, bundle.name, force=True)


def write_tarball(folder: Path, tarball: Path, arcname: str, force: bool = False) -> None:
    """Write the .tar.gz of a bundle folder through a temporary name (a failure leaves no partial
    archive): its folders, the files its manifest lists, the manifest and its signature — each
    opened without following links, so the archive holds regular files and folders only."""
    listed = read_manifest(folder, finished=True)["files"]
    names = [*sorted(listed), *(n for n in UNLISTED if os.path.lexists(folder / n))]
    folders = sorted({posixpath.dirname(n) for n in names} - {""})
    folders = sorted({"/".join(f.split("/")[: i + 1]) for f in folders for i in range(f.count("/") + 1)})
    with atomic_file(tarball, force) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=arcname, recursive=False)
        for rel in folders:
            mode = (folder / rel).lstat().st_mode
            if not stat.S_ISDIR(mode):
                raise InputFileError(f"{folder / rel} is {kind_of(mode)}: a bundle holds only folders and regular files")
            tar.add(folder / rel, arcname=f"{arcname}/{rel}", recursive=False)
        for rel in names:
            with open_regular(folder / rel, "bundle file", follow_symlinks=False) as f:
                info = tar.gettarinfo(fileobj=f, arcname=f"{arcname}/{rel}")
                tar.addfile(info, f)


# -- signatures -----------------------------------------------------------------------------------------
def _load_key(path: str | os.PathLike, private: bool):
    """An Ed25519 key from a PEM file (what `openssl genpkey -algorithm ed25519` and `openssl pkey
    -pubout` write); InputFileError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    what = "signing key" if private else "verification key"
    data = read_bytes(path, what, 1 << 16)
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except TypeError:  # an encrypted private key
        raise InputFileError(f"{what} {path} is encrypted: give an unencrypted PEM key") from None
    except Exception:  # ValueError, UnsupportedAlgorithm: not a PEM key of a known kind
        raise InputFileError(f"{what} {path} is not a PEM {'private' if private else 'public'} key") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise InputFileError(f"{what} {path} is not an Ed25519 key (make one with "
                             "`openssl genpkey -algorithm ed25519`)")
    return key


def load_signing_key(path: str | os.PathLike):
    """The Ed25519 private key `pack --sign` signs with (read before any work)."""
    return _load_key(path, private=True)


def sign_bundle(bundle: Path, key) -> None:
    """Write `manifest.sig`: the raw 64-byte Ed25519 signature of manifest.json's bytes."""
    data = read_bytes(bundle / MANIFEST, "bundle manifest", follow_symlinks=False)
    (bundle / SIGNATURE).write_bytes(key.sign(data))


# -- the check --------------------------------------------------------------------------------------------
@dataclass
class BundleCheck:
    """What `pack --check` found: the manifest, and whether the bundle is signed and the signature verified."""

    manifest: dict
    signed: bool
    verified: bool


class _Contents:
    """What a bundle holds, folder or archive alike: regular files (sha256, bytes), folders, problems."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, int]] = {}
        self.folders: set[str] = set()
        self.problems: list[str] = []
        self.manifest: bytes | None = None
        self.signature: bytes | None = None

    def add_file(self, rel: str, stream) -> None:
        if rel in self.files:
            self.problems.append(f"{rel} appears more than once")
            return
        h, size, keep = hashlib.sha256(), 0, rel in UNLISTED
        kept = bytearray()
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            if keep and size <= _MAX_MANIFEST_BYTES:
                kept += chunk
        self.files[rel] = (h.hexdigest(), size)
        if rel == MANIFEST:
            self.manifest = bytes(kept)
        elif rel == SIGNATURE:
            self.signature = bytes(kept)


def _inside(rel: str) -> bool:
    """A relative POSIX path that stays inside the bundle (no '..', '.', empty part or backslash)."""
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(
        part not in ("", ".", "..") for part in rel.split("/"))


def _read_folder(bundle: Path) -> _Contents:
    found = _Contents()
    for folder, dirs, files in os.walk(bundle):  # links to folders are listed, never entered
        for name in sorted(dirs + files):
            path = Path(folder, name)
            rel = path.relative_to(bundle).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                found.folders.add(rel)
            elif stat.S_ISREG(mode):
                with open_regular(path, "bundle file", follow_symlinks=False, error=BundleError) as f:
                    found.add_file(rel, f)
            else:
                found.problems.append(f"{rel} is {kind_of(mode)}, not a regular file")
    return found


def _read_archive(path: Path) -> _Contents:
    """The members of a .tar.gz, read as a stream (nothing is extracted): one top-level folder
    holding folders and regular files only."""
    found, roots = _Contents(), set()
    try:
        with open_regular(path, "bundle archive") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                name = member.name.rstrip("/")
                if not _inside(name):
                    found.problems.append(f"archive member {member.name!r} is not a relative path inside the bundle")
                    continue
                root, _, rel = name.partition("/")
                if not rel and not member.isdir():
                    found.problems.append(f"{name} lies outside the bundle folder (archive members must all be "
                                          "inside one folder)")
                    continue
                roots.add(root)
                if member.isdir():
                    if rel:
                        found.folders.add(rel)
                elif member.isreg():
                    found.add_file(rel, tar.extractfile(member))
                else:
                    kind = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "a special file"
                    found.problems.append(f"{name} is {kind}, not a regular file")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise BundleError(f"{path} is not a readable .tar.gz: {exc or type(exc).__name__}") from None
    if len(roots) > 1:
        found.problems.append(f"the archive holds {len(roots)} top-level folders ({', '.join(sorted(roots))}); "
                              "a bundle is one")
    return found


def _problems(found: _Contents, manifest: dict) -> list[str]:
    problems = list(found.problems)
    listed = {}
    for rel, entry in manifest["files"].items():
        if not _inside(rel) or rel in UNLISTED:
            problems.append(f"manifest entry {rel!r} is not a relative path inside the bundle")
        else:
            listed[rel] = entry
    for rel, entry in sorted(listed.items()):
        if rel not in found.files:
            problems.append(f"{rel} is missing")
        elif found.files[rel] != (entry["sha256"], entry["bytes"]):
            problems.append(f"{rel} was modified (sha256 differs)")
    problems += [f"{rel} is not in the manifest" for rel in sorted(set(found.files) - set(listed) - set(UNLISTED))]
    needed = {"/".join(rel.split("/")[:i]) for rel in listed for i in range(1, rel.count("/") + 1)}
    problems += [f"{rel}/ is a folder that holds no listed file" for rel in sorted(found.folders - needed)]
    return problems


def verify_bundle(bundle: str | os.PathLike, verify_key: str | os.PathLike | None = None) -> BundleCheck:
    """Check a bundle folder or .tar.gz exactly against its manifest (see the module's docstring)
    and, with `verify_key` (a PEM Ed25519 public key), its signature. InputFileError (exit 2) when
    the bundle or key cannot be read; BundleError (exit 1) when the bundle does not verify."""
    bundle = Path(bundle)
    if not os.path.lexists(bundle):
        raise InputFileError(f"bundle does not exist: {bundle}")
    public = _load_key(verify_key, private=False) if verify_key is not None else None
    mode = bundle.lstat().st_mode
    if stat.S_ISDIR(mode):
        found = _read_folder(bundle)
    elif stat.S_ISREG(mode):
        found = _read_archive(bundle)
    else:
        raise InputFileError(f"bundle {bundle} is {kind_of(mode)}: give a bundle folder or its .tar.gz")
    if found.manifest is None:
        raise BundleError(f"no {MANIFEST} in {bundle}" + (f" ({found.problems[0]})" if found.problems else ""))
    manifest = parse_manifest(found.manifest, f"{bundle}: {MANIFEST}", finished=True, error=BundleError)
    problems = _problems(found, manifest)
    if problems:
        raise BundleError(f"bundle check failed for {bundle}: " + "; ".join(problems[:5])
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    signed, verified = found.signature is not None, False
    if public is not None:
        from cryptography.exceptions import InvalidSignature

        if not signed:
            raise BundleError(f"{bundle} is not signed (no {SIGNATURE}), and --verify-key asks for a signature")
        try:
            public.verify(found.signature, found.manifest)
        except InvalidSignature:
            raise BundleError(f"the signature of {bundle} does not verify with {verify_key}: the manifest was "
                              "changed after signing, or signed with another key") from None
        verified = True
    return BundleCheck(manifest, signed, verified)


def check_bundle(bundle: str | os.PathLike, verify_key: str | os.PathLike | None = None) -> dict:
    """`verify_bundle` returning only the manifest."""
    return verify_bundle(bundle, verify_key).manifest

