"""Bad, careless and hostile input through the real CLI: one `error:` line, the right exit code, no
traceback, nothing outside the case's own folder created or changed, no temporary left behind, no
hang; a bundle never carries a byte edgesvd did not write, and `pack --check` proves what it says.

Every case of issue 11 is one row of CASES: it builds its input in a fresh folder (also the working
directory), runs `edgesvd …` with click's runner in this process (with a hang guard), and the table
runner checks the common promises. A few cases need real processes (two concurrent writers, a
SIGKILLed run, a memory limit) and are tests of their own below the table.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgesvd.cli import main

OPENSSL = shutil.which("openssl")
SECRET = b"EDGESVD-HARDENING-SECRET-7f3a9c"  # the bytes of a file a bundle must never carry
FAST = ["--method", "plain", "--calib-samples", "4", "--calib-len", "16", "--quiet"]
WHITEN = ["--method", "whiten", "--calib-samples", "4", "--calib-len", "16", "--quiet"]


# -- the inputs every case starts from ----------------------------------------------------------------
class World:
    """A tiny Llama compressed with `plain`, its ONNX export, parity and latency reports as JSON, and a
    bundle (folder and .tar.gz), built once through the library; cases copy what they change."""

    def __init__(self, root: Path, llama: Path, bert: Path) -> None:
        from edgesvd import CalibrationConfig, compress
        from edgesvd.exporters.bundle import pack
        from edgesvd.exporters.export import export_checkpoint
        from edgesvd.exporters.parity import ParityConfig, verify
        from edgesvd.exporters.profiling import ProfileConfig, profile
        from edgesvd.methods import Plain

        self.root, self.llama, self.bert = root, llama, bert
        self.ck, self.onnx, self.bundle = root / "ck", root / "onnx", root / "bundle"
        self.parity, self.profile = root / "parity.json", root / "profile.json"
        compress(str(llama), Plain(keep=0.5), calib=CalibrationConfig(num_sequences=8, seq_len=32),
                 device="cpu").save(self.ck)
        export_checkpoint(self.ck, self.onnx)
        parity = verify(self.ck, self.onnx, ParityConfig(batch=2, seq_len=16, new_tokens=4)).to_json()
        prof = profile(self.onnx, None, ProfileConfig(seq_len=8, warmup=1, runs=2)).to_json()
        self.parity.write_text(json.dumps(parity))
        self.profile.write_text(json.dumps(prof))
        pack(self.onnx, self.ck, self.bundle, parity, prof)
        self.tarball = root / "bundle.tar.gz"
        self._keys: tuple[Path, Path] | None = None

    def copy(self, what: str, into: Path, name: str | None = None) -> Path:
        """A private copy of the checkpoint, export, bundle or a model folder (links copied as links)."""
        src = {"ck": self.ck, "onnx": self.onnx, "bundle": self.bundle, "llama": self.llama, "bert": self.bert}[what]
        return Path(shutil.copytree(src, into / (name or what), symlinks=True))

    def pack_argv(self, onnx: Path, out, *extra) -> list:
        """`pack` with the reports given as files, so nothing is measured."""
        return ["pack", onnx, "--checkpoint", self.ck, "--out", out, "--parity-report", self.parity,
                "--profile-report", self.profile, *extra]

    def keys(self) -> tuple[Path, Path]:
        """An Ed25519 key pair made by openssl (PEM private key, PEM public key)."""
        if OPENSSL is None:
            pytest.skip("openssl is not installed")
        if self._keys is None:
            private, public = self.root / "signing.pem", self.root / "signing.pub.pem"
            subprocess.run([OPENSSL, "genpkey", "-algorithm", "ed25519", "-out", private], check=True)
            subprocess.run([OPENSSL, "pkey", "-in", private, "-pubout", "-out", public], check=True)
            self._keys = private, public
        return self._keys


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir, tiny_bert_dir) -> World:
    return World(tmp_path_factory.mktemp("hardening-world"), tiny_llama_dir, tiny_bert_dir)


# -- helpers used by the cases ---------------------------------------------------------------------------
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def _edit_manifest(bundle: Path, edit: Callable[[dict], object]) -> None:
    manifest = _json(bundle / "manifest.json")
    edit(manifest)
    _write_json(bundle / "manifest.json", manifest)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_section(ck: Path, edit: Callable[[dict], object]) -> Path:
    config = _json(ck / "config.json")
    edit(config["edgesvd"])
    _write_json(ck / "config.json", config)
    return ck


def _factorized(section: dict) -> list[dict]:
    return [layer for layer in section["layers"] if layer["rank"] is not None]


def _retar(world: World, t: Path, add: Callable[[tarfile.TarFile], None]) -> Path:
    """The world's tarball with every member kept, plus what `add` appends."""
    out = t / "b.tar.gz"
    with tarfile.open(world.tarball, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        add(dst)
    return out


def _tar_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _secret(t: Path) -> Path:
    path = t.parent / f"{t.name}-secret.txt"  # outside the case folder: nothing may copy it in
    path.write_bytes(SECRET + b"\n")
    return path


def _corrupt_onnx(world: World, t: Path) -> Path:
    onnx = world.copy("onnx", t)
    model = onnx / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return onnx


def _profile_toml(t: Path, replace: dict[str, str]) -> Path:
    """A copy of the built-in raspberry-pi-5 profile with some `table.key` values replaced."""
    from edgesvd.profiles import builtin_dir

    replace, out, table = dict(replace), [], ""
    for line in (builtin_dir() / "raspberry-pi-5.toml").read_text().splitlines():
        if line.startswith("["):
            table = line.strip("[] ")
        key = ".".join(filter(None, (table, line.split("=", 1)[0].strip())))
        out.append(f"{key.rpartition('.')[2]} = {replace.pop(key)}" if "=" in line and key in replace else line)
    assert not replace, replace
    path = t / "my.toml"
    path.write_text("\n".join(out) + "\n")
    return path


# -- the table -----------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    section: str  # the issue's section: 1 symlinks, 2 pack --check, 3 outputs, 4 inputs, 5 validation, 6 one line
    make: Callable  # (world, folder) -> argv, or (argv, check) with check(world, folder, result)
    code: int  # expected exit code
    says: tuple[str, ...]  # words the `error:` line (or, on success, the output) must contain
    writes: tuple[str, ...] = ()  # names the command may create in the case folder (on success)
    fsize: int | None = None  # RLIMIT_FSIZE while the command runs (`ulimit -f`)


CASES: list[Case] = []


def case(id: str, section: str, code: int, *says: str, writes: tuple[str, ...] = (), fsize: int | None = None):
    def register(make):
        CASES.append(Case(id, section, make, code, says, writes, fsize))
        return make
    return register


def _no_secret_anywhere(world, t, result):
    """No byte of the link target reached any file (tarballs are searched decompressed)."""
    for path in t.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            assert SECRET not in data, f"{path} carries the link target's bytes"
    assert not (t / "b").exists() and not (t / "b.tar.gz").exists()


# 1. pack refuses symlinks and anything that is not a regular file -----------------------------------------
@case("pack-symlink-to-file-outside", "1", 2, "notes.txt", "symbolic link")
def _(w, t):
    onnx = w.copy("onnx", t)
    (onnx / "notes.txt").symlink_to(_secret(t))
    return w.pack_argv(onnx, t / "b"), _no_secret_anywhere


@case("pack-symlink-to-etc-passwd", "1", 2, "notes.txt", "symbolic link")
def _(w, t):
    onnx = w.copy("onnx", t)
    (onnx / "notes.txt").symlink_to("/etc/passwd")

    def check(w, t, result):
        passwd = Path("/etc/passwd").read_bytes().splitlines()[0]
        assert not any(passwd in p.read_bytes() for p in t.rglob("*") if p.is_file() and not p.is_symlink())
        assert not (t / "b").exists()
    return w.pack_argv(onnx, t / "b"), check


@case("pack-symlink-inside-the-folder", "1", 2, "tokenizer_config.json", "symbolic link")
def _(w, t):
    onnx = w.copy("onnx", t)
    (onnx / "tokenizer_config.json").rename(onnx / "tokenizer_config.bak")
    (onnx / "tokenizer_config.json").symlink_to("tokenizer_config.bak")
    return w.pack_argv(onnx, t / "b")


@case("pack-model-onnx-is-a-symlink", "1", 2, "model.onnx", "symbolic link")
def _(w, t):
    onnx = w.copy("onnx", t)
    elsewhere = t / "elsewhere"
    elsewhere.mkdir()
    (onnx / "model.onnx").rename(elsewhere / "model.onnx")
    (onnx / "model.onnx").symlink_to(elsewhere / "model.onnx")
    return w.pack_argv(onnx, t / "b")


@case("pack-fifo-in-the-export", "1", 2, "extra.txt", "not a regular file")
def _(w, t):
    onnx = w.copy("onnx", t)
    os.mkfifo(onnx / "extra.txt")
    return w.pack_argv(onnx, t / "b")


@case("pack-spectrum-is-a-symlink", "1", 2, "spectrum.safetensors", "symbolic link")
def _(w, t):
    ck = w.copy("ck", t)
    (ck / "spectrum.safetensors").rename(t / "spectrum.real")
    (ck / "spectrum.safetensors").symlink_to(t / "spectrum.real")
    return ["pack", w.onnx, "--checkpoint", ck, "--out", t / "b", "--parity-report", w.parity,
            "--profile-report", w.profile]


# 2. pack --check is exact ----------------------------------------------------------------------------------
@case("check-intact-folder", "2", 0, "ok:", "files match")
def _(w, t):
    return ["pack", "--check", w.copy("bundle", t)]


@case("check-intact-tarball", "2", 0, "ok:", "files match")
def _(w, t):
    return ["pack", "--check", w.tarball]


@case("check-added-nested-manifest-json", "2", 1, "reports/manifest.json")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "reports" / "manifest.json").write_text("{}")
    return ["pack", "--check", b]


@case("check-added-symlink-to-etc", "2", 1, "etc", "symbolic link")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "etc").symlink_to("/etc")
    return ["pack", "--check", b]


@case("check-added-empty-folder", "2", 1, "empty", "folder")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "empty").mkdir()
    return ["pack", "--check", b]


@case("check-added-fifo", "2", 1, "reports/pipe", "not a regular file")
def _(w, t):
    b = w.copy("bundle", t)
    os.mkfifo(b / "reports" / "pipe")
    return ["pack", "--check", b]


@case("check-manifest-is-a-symlink", "2", 1, "manifest.json", "symbolic link")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "manifest.json").rename(t / "manifest.real")
    (b / "manifest.json").symlink_to(t / "manifest.real")
    return ["pack", "--check", b]


@case("check-tar-extra-top-level-file", "2", 1, "README.txt")
def _(w, t):
    return ["pack", "--check", _retar(w, t, lambda tar: _tar_file(tar, "README.txt", b"hello"))]


@case("check-tar-symlink-member", "2", 1, "bundle/etc", "symbolic link")
def _(w, t):
    def add(tar):
        link = tarfile.TarInfo("bundle/etc")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    return ["pack", "--check", _retar(w, t, add)]


@case("check-tar-duplicate-member", "2", 1, "model.onnx", "more than once")
def _(w, t):
    return ["pack", "--check", _retar(w, t, lambda tar: _tar_file(tar, "bundle/model.onnx", b"replaced"))]


@case("check-manifest-entry-dotdot", "2", 1, "../../../../etc/passwd")
def _(w, t):
    b = w.copy("bundle", t)
    entry = {"sha256": _sha(Path("/etc/passwd")), "bytes": Path("/etc/passwd").stat().st_size}
    _edit_manifest(b, lambda m: m["files"].update({"../../../../etc/passwd": entry}))
    return ["pack", "--check", b]


@case("check-manifest-entry-absolute", "2", 1, "/etc/passwd")
def _(w, t):
    b = w.copy("bundle", t)
    entry = {"sha256": _sha(Path("/etc/passwd")), "bytes": Path("/etc/passwd").stat().st_size}
    _edit_manifest(b, lambda m: m["files"].update({"/etc/passwd": entry}))
    return ["pack", "--check", b]


@case("check-tar-manifest-entry-dotdot", "2", 1, "../../../../etc/passwd")
def _(w, t):
    manifest = _json(w.bundle / "manifest.json")
    manifest["files"]["../../../../etc/passwd"] = {"sha256": _sha(Path("/etc/passwd")),
                                                   "bytes": Path("/etc/passwd").stat().st_size}
    out = t / "b.tar.gz"
    with tarfile.open(w.tarball, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            if member.name == "bundle/manifest.json":
                _tar_file(dst, member.name, json.dumps(manifest).encode())
            else:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return ["pack", "--check", out]


@case("check-manifest-schema-version-x", "2", 1, "manifest.json", "schema_version")
def _(w, t):
    b = w.copy("bundle", t)
    _edit_manifest(b, lambda m: m.update(schema_version="x"))
    return ["pack", "--check", b]


@case("check-manifest-files-is-a-list", "2", 1, "manifest.json", "files")
def _(w, t):
    b = w.copy("bundle", t)
    _edit_manifest(b, lambda m: m.update(files=sorted(m["files"])))
    return ["pack", "--check", b]


@case("check-manifest-entry-without-sha256", "2", 1, "manifest.json", "sha256")
def _(w, t):
    b = w.copy("bundle", t)
    _edit_manifest(b, lambda m: m["files"]["model.onnx"].pop("sha256"))
    return ["pack", "--check", b]


@case("check-manifest-not-json", "2", 1, "manifest.json", "JSON")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "manifest.json").write_text("{ not json")
    return ["pack", "--check", b]


@case("check-manifest-not-utf8", "2", 1, "manifest.json", "UTF-8")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "manifest.json").write_bytes(b'{"schema_version": 1, "files": {"\xff": 1}}')
    return ["pack", "--check", b]


@case("check-missing-bundle", "2", 2, "does not exist")
def _(w, t):
    return ["pack", "--check", t / "no-such-bundle"]


@case("check-rewritten-manifest-says-unsigned", "2", 0, "ok:", "not signed")
def _(w, t):
    b = w.copy("bundle", t)
    (b / "run.py").write_text("print('replaced')\n")
    _edit_manifest(b, lambda m: m["files"]["run.py"].update(sha256=_sha(b / "run.py"), bytes=(b / "run.py").stat().st_size))
    return ["pack", "--check", b]


def _signed_bundle(w: World, t: Path) -> Path:
    private, _ = w.keys()
    result = CliRunner().invoke(main, [str(a) for a in w.pack_argv(w.onnx, t / "signed", "--sign", private)])
    assert result.exit_code == 0, result.output
    return t / "signed"


@case("sign-and-verify", "2", 0, "wrote", "signed", writes=("signed", "signed.tar.gz"))
def _(w, t):
    private, public = w.keys()

    def check(w, t, result):
        signed = t / "signed"
        assert result.exit_code == 0
        for target in (signed, t / "signed.tar.gz"):
            r = CliRunner().invoke(main, ["pack", "--check", str(target), "--verify-key", str(public)])
            assert r.exit_code == 0 and "signature" in r.output, r.output
        # The standard tool verifies the same signature without edgesvd (what a device would run).
        subprocess.run([OPENSSL, "pkeyutl", "-verify", "-pubin", "-inkey", public, "-rawin",
                        "-in", signed / "manifest.json", "-sigfile", signed / "manifest.sig"],
                       check=True, capture_output=True)
    return w.pack_argv(w.onnx, t / "signed", "--sign", private), check


@case("verify-key-rewritten-manifest", "2", 1, "signature")
def _(w, t):
    _, public = w.keys()
    b = _signed_bundle(w, t)
    (b / "run.py").write_text("print('replaced')\n")
    _edit_manifest(b, lambda m: m["files"]["run.py"].update(sha256=_sha(b / "run.py"), bytes=(b / "run.py").stat().st_size))
    return ["pack", "--check", b, "--verify-key", public]


@case("verify-key-wrong-key", "2", 1, "signature")
def _(w, t):
    b = _signed_bundle(w, t)
    subprocess.run([OPENSSL, "genpkey", "-algorithm", "ed25519", "-out", t / "other.pem"], check=True)
    subprocess.run([OPENSSL, "pkey", "-in", t / "other.pem", "-pubout", "-out", t / "other.pub.pem"], check=True)
    return ["pack", "--check", b, "--verify-key", t / "other.pub.pem"]


@case("verify-key-unsigned-bundle", "2", 1, "not signed")
def _(w, t):
    _, public = w.keys()
    return ["pack", "--check", w.copy("bundle", t), "--verify-key", public]


@case("report-refuses-to-change-a-signed-bundle", "2", 2, "signed")
def _(w, t):
    return ["report", _signed_bundle(w, t)]


@case("sign-with-a-file-that-is-no-key", "2", 2, "key")
def _(w, t):
    w.keys()
    (t / "key.pem").write_text("not a key\n")
    return w.pack_argv(w.onnx, t / "b", "--sign", t / "key.pem")


# 3. nothing is lost without --force -------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@case("user-folder-named-like-a-temporary-is-kept", "3", 0, "wrote", writes=("ox",))
def _(w, t):
    mine = t / f".ox.{_dead_pid()}.backup"
    mine.mkdir()
    (mine / "precious.txt").write_text("the user's own work\n")

    def check(w, t, result):
        assert (mine / "precious.txt").read_text() == "the user's own work\n"
    return ["compress", w.llama, *FAST, "--out", "ox"], check


@case("verify-json-exists", "3", 2, "report.json", "exists")
def _(w, t):
    (t / "report.json").write_text("keep me\n")
    return ["verify", w.ck, w.onnx, "--batch", "1", "--seq-len", "8", "--new-tokens", "2", "--json", t / "report.json"]


@case("profile-json-exists", "3", 2, "report.json", "exists")
def _(w, t):
    (t / "report.json").write_text("keep me\n")
    return ["profile", w.onnx, "--no-dense", "--runs", "1", "--warmup", "0", "--seq-len", "8",
            "--json", t / "report.json"]


@case("verify-json-is-a-folder", "6", 2, "out.json", "folder")
def _(w, t):
    (t / "out.json").mkdir()
    return ["verify", w.ck, w.onnx, "--batch", "1", "--seq-len", "8", "--new-tokens", "2", "--json", t / "out.json"]


@case("profile-json-is-a-folder", "6", 2, "out.json", "folder")
def _(w, t):
    (t / "out.json").mkdir()
    return ["profile", w.onnx, "--no-dense", "--runs", "1", "--warmup", "0", "--seq-len", "8",
            "--json", t / "out.json"]


@case("export-out-is-the-input", "3", 2, "ck", "input")
def _(w, t):
    ck = w.copy("ck", t)
    return ["export", ck, "--out", ck, "--force"]


@case("export-out-inside-the-input", "3", 2, "input")
def _(w, t):
    ck = w.copy("ck", t)
    return ["export", ck, "--out", ck / "onnx"]


@case("export-out-contains-the-input", "3", 2, "input")
def _(w, t):
    (t / "work").mkdir()
    ck = w.copy("ck", t / "work")
    return ["export", ck, "--out", t / "work", "--force"]


@case("compress-out-is-the-model-folder", "3", 2, "input")
def _(w, t):
    model = w.copy("llama", t)
    return ["compress", model, *FAST, "--out", model, "--force"]


@case("export-force-onto-a-file", "3", 2, "out", "not a folder")
def _(w, t):
    (t / "out").write_text("a file the user keeps\n")
    return ["export", w.ck, "--out", t / "out", "--force"]


@case("pack-force-onto-a-folder-named-like-the-tarball", "3", 2, "b.tar.gz", "folder")
def _(w, t):
    (t / "b.tar.gz").mkdir()
    return w.pack_argv(w.onnx, t / "b", "--force")


@case("pack-out-dot", "6", 2, "current folder")
def _(w, t):
    return w.pack_argv(w.onnx, ".")


@case("pack-out-dot-force", "6", 2, "current folder")
def _(w, t):
    return w.pack_argv(w.onnx, ".", "--force")


# 4. no input hangs or eats the machine ------------------------------------------------------------------
def _compress_calib(w, t, source) -> list:
    """`compress --method whiten` (plain reads no calibration text)."""
    return ["compress", w.llama, *WHITEN, "--calib", source, "--out", t / "ck"]


@case("calib-fifo", "4", 2, "pipe.txt", "not a regular file")
def _(w, t):
    os.mkfifo(t / "pipe.txt")
    return _compress_calib(w, t, t / "pipe.txt")


@case("calib-dev-zero", "4", 2, "/dev/zero", "not a regular file")
def _(w, t):
    return _compress_calib(w, t, "/dev/zero")


@case("calib-folder-holding-a-fifo", "4", 2, "b.txt", "not a regular file")
def _(w, t):
    (t / "corpus").mkdir()
    (t / "corpus" / "a.txt").write_text("A sentence of calibration text that is long enough.\n")
    os.mkfifo(t / "corpus" / "b.txt")
    return _compress_calib(w, t, t / "corpus")


@case("calib-binary-bin-ls", "4", 2, "/bin/ls", "UTF-8")
def _(w, t):
    return _compress_calib(w, t, "/bin/ls")


@case("calib-latin1-text", "4", 2, "latin1.txt", "UTF-8")
def _(w, t):
    (t / "latin1.txt").write_bytes("Le café est très bon, et la crème aussi.\n".encode("latin-1"))
    return _compress_calib(w, t, t / "latin1.txt")


@case("calib-utf16-text", "4", 2, "utf16.txt", "UTF-8")
def _(w, t):
    (t / "utf16.txt").write_bytes("A sentence written as UTF-16 by some editor.\n".encode("utf-16"))
    return _compress_calib(w, t, t / "utf16.txt")


@case("calib-utf8-with-bom-is-read", "4", 0, "wrote", writes=("ck",))
def _(w, t):
    (t / "bom.txt").write_bytes("\ufeffThe quick brown fox jumps over the lazy dog again and again.\n".encode())
    return _compress_calib(w, t, t / "bom.txt")


# 5. validation that fails fast --------------------------------------------------------------------------
@case("profile-budget-nan", "5", 2, "my.toml", "budgets.peak_memory", "finite")
def _(w, t):
    return ["profiles", "show", _profile_toml(t, {"budgets.peak_memory": "nan"})]


@case("profile-efficiency-nan", "5", 2, "my.toml", "runtime.efficiency", "finite")
def _(w, t):
    return ["profiles", "show", _profile_toml(t, {"runtime.efficiency": "nan"})]


@case("profile-peak-gflops-inf", "5", 2, "my.toml", "device.peak_gflops", "finite")
def _(w, t):
    return ["profiles", "show", _profile_toml(t, {"device.peak_gflops": "inf"})]


@case("profile-toml-not-utf8", "6", 2, "my.toml", "UTF-8")
def _(w, t):
    path = t / "my.toml"
    path.write_bytes(b'schema_version = 1\nname = "caf\xe9"\n')
    return ["profiles", "show", path]


@case("rank-multiple-above-every-break-even", "5", 2, "--rank-multiple", "break-even")
def _(w, t):
    return ["compress", w.llama, *FAST, "--rank-multiple", "100000", "--out", t / "ck"]


@case("calib-len-above-max-positions", "5", 2, "--calib-len", "256")
def _(w, t):
    (t / "long.txt").write_text(" ".join(["word"] * 3000) + ".\n")
    return ["compress", w.bert, "--method", "whiten", "--calib-samples", "4", "--calib-len", "1000", "--quiet",
            "--calib", t / "long.txt", "--out", t / "ck"]


def _section_case(id: str, edit: Callable[[dict], object], *says: str, command: str = "inspect"):
    @case(id, "5", 2, *says)
    def _(w, t):
        ck = _edit_section(w.copy("ck", t), edit)
        return ["inspect", ck] if command == "inspect" else ["export", ck, "--out", t / "onnx"]


def _set_first_rank(value):
    return lambda s: _factorized(s)[0].update(rank=value)


_section_case("section-rank-10000", _set_first_rank(10000), "rank")
_section_case("section-rank-minus-5", _set_first_rank(-5), "rank")
_section_case("section-rank-0", _set_first_rank(0), "rank")
_section_case("section-rank-95.5", _set_first_rank(95.5), "rank")
_section_case("section-rank-differs-from-factors", _set_first_rank(8), "shape")
_section_case("section-layer-missing", lambda s: s["layers"].remove(_factorized(s)[0]), "model.layers.0")
_section_case("section-layer-unknown", lambda s: _factorized(s)[0].update(name="model.no_such_layer"),
              "model.no_such_layer")
_section_case("section-layers-empty", lambda s: s.update(layers=[]), "layers")
_section_case("section-keep-wrong-type", lambda s: s.update(keep_requested="half"), "keep_requested")
_section_case("section-layers-wrong-type", lambda s: s.update(layers="all"), "layers")
_section_case("section-rank-minus-5-export", _set_first_rank(-5), "rank", command="export")
_section_case("section-layers-empty-export", lambda s: s.update(layers=[]), "layers", command="export")


@case("section-not-an-object", "5", 2, "edgesvd")
def _(w, t):
    ck = w.copy("ck", t)
    config = _json(ck / "config.json")
    config["edgesvd"] = [1, 2]
    _write_json(ck / "config.json", config)
    return ["inspect", ck]


@case("spectrum-corrupt", "5", 2, "spectrum.safetensors")
def _(w, t):
    ck = w.copy("ck", t)
    (ck / "spectrum.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return ["inspect", ck]


@case("spectrum-kept-length-differs", "5", 2, "spectrum.safetensors")
def _(w, t):
    from safetensors.torch import load_file, save_file

    ck = w.copy("ck", t)
    tensors = load_file(ck / "spectrum.safetensors")
    key = next(k for k in tensors if k.endswith(".kept"))
    tensors[key] = tensors[key][:3].contiguous()
    save_file(tensors, ck / "spectrum.safetensors")
    return ["inspect", ck]


@case("weights-index-names-a-file-outside", "5", 2, "model.safetensors.index.json", "weight_map")
def _(w, t):
    ck = w.copy("ck", t)
    _write_json(ck / "model.safetensors.index.json", {"weight_map": {"lm_head.weight": "../../outside.safetensors"}})
    return ["inspect", ck]


@case("weights-index-names-a-missing-part", "5", 2, "model-00002-of-00002.safetensors")
def _(w, t):
    ck = w.copy("ck", t)
    _write_json(ck / "model.safetensors.index.json", {"weight_map": {"lm_head.weight": "model.safetensors",
                                                                   "x.weight": "model-00002-of-00002.safetensors"}})
    return ["export", ck, "--out", t / "onnx"]


# 6. one line, always -----------------------------------------------------------------------------------
@case("compress-out-unwritable", "6", 2, "/sys/edgesvd-hardening", "writ")
def _(w, t):
    return ["compress", w.llama, *FAST, "--out", "/sys/edgesvd-hardening/ck"]


@case("compress-out-under-a-file", "6", 2, "file.txt", "not a folder")
def _(w, t):
    (t / "file.txt").write_text("x\n")
    return ["compress", w.llama, *FAST, "--out", t / "file.txt" / "ck"]


@case("profile-truncated-model-onnx", "6", 2, "model.onnx")
def _(w, t):
    return ["profile", _corrupt_onnx(w, t), "--no-dense", "--runs", "1", "--warmup", "0", "--seq-len", "8"]


@case("verify-truncated-model-onnx", "6", 2, "model.onnx")
def _(w, t):
    return ["verify", w.ck, _corrupt_onnx(w, t), "--batch", "1", "--seq-len", "8", "--new-tokens", "2"]


def _export_meta_case(id: str, content: bytes, command: str):
    @case(id, "6", 2, "edgesvd_export.json")
    def _(w, t):
        onnx = w.copy("onnx", t)
        (onnx / "edgesvd_export.json").write_bytes(content)
        if command == "verify":
            return ["verify", w.ck, onnx, "--batch", "1", "--seq-len", "8", "--new-tokens", "2"]
        return w.pack_argv(onnx, t / "b")


_export_meta_case("export-meta-list-verify", b"[]", "verify")
_export_meta_case("export-meta-list-pack", b"[]", "pack")
_export_meta_case("export-meta-not-utf8-verify", b'{"kind": "compr\xe9ssed"}', "verify")
_export_meta_case("export-meta-not-utf8-pack", b'{"kind": "compr\xe9ssed"}', "pack")
_export_meta_case("export-meta-missing-keys-pack", b"{}", "pack")


@case("pack-parity-report-list", "6", 2, "parity.json")
def _(w, t):
    (t / "parity.json").write_text("[1, 2]")
    return ["pack", w.onnx, "--checkpoint", w.ck, "--out", t / "b", "--parity-report", t / "parity.json",
            "--profile-report", w.profile]


@case("pack-profile-report-list", "6", 2, "profile.json")
def _(w, t):
    (t / "profile.json").write_text("[1, 2]")
    return ["pack", w.onnx, "--checkpoint", w.ck, "--out", t / "b", "--parity-report", w.parity,
            "--profile-report", t / "profile.json"]


@case("pack-parity-report-not-utf8", "6", 2, "parity.json", "UTF-8")
def _(w, t):
    (t / "parity.json").write_bytes(b'{"ok": true, "x": "\xff"}')
    return ["pack", w.onnx, "--checkpoint", w.ck, "--out", t / "b", "--parity-report", t / "parity.json",
            "--profile-report", w.profile]


def _report_case(id: str, edit: Callable[[Path], object], *says: str):
    @case(id, "6", 2, *says)
    def _(w, t):
        b = w.copy("bundle", t)
        edit(b)
        return ["report", b]


_report_case("report-malformed-compression", lambda b: _edit_manifest(b, lambda m: m.update(compression=[])),
             "manifest.json", "compression")
_report_case("report-malformed-model", lambda b: _edit_manifest(b, lambda m: m.update(model="x")),
             "manifest.json", "model")
_report_case("report-malformed-parity", lambda b: _edit_manifest(b, lambda m: m.update(parity={"providers": [1]})),
             "manifest.json", "parity")
_report_case("report-malformed-config-layers", lambda b: _edit_section(b, lambda s: s.update(layers="x")),
             "config.json", "layers")


@case("report-missing-bundle", "6", 2, "does not exist")
def _(w, t):
    return ["report", t / "nothing"]


@case("run-eval-bin-ls-encoder", "6", 2, "/bin/ls", "UTF-8")
def _(w, t):
    return ["run", w.bert, "--method", "plain", "--eval", "/bin/ls", "--out-root", t / "o", "--runs", "1"]


@case("run-eval-bin-ls-decoder", "6", 2, "/bin/ls", "UTF-8")
def _(w, t):
    return ["run", w.llama, "--method", "plain", "--eval", "/bin/ls", "--out-root", t / "o", "--runs", "1"]


@case("ulimit-f-compress", "6", 2, "File too large", fsize=64_000)
def _(w, t):
    return ["compress", w.llama, *FAST, "--out", t / "ck"]


@case("ulimit-f-pack", "6", 2, "File too large", fsize=64_000)
def _(w, t):
    return w.pack_argv(w.onnx, t / "b")


@case("usage-error-bad-float", "6", 2, "--keep")
def _(w, t):
    return ["compress", w.llama, "--keep", "half", "--out", t / "ck"]


@case("usage-error-unknown-option", "6", 2, "--bogus")
def _(w, t):
    return ["pack", "--bogus"]


@case("usage-error-missing-argument", "6", 2, "CHECKPOINT")
def _(w, t):
    return ["verify"]


@case("pack-without-out", "6", 2, "--out")
def _(w, t):
    return ["pack", w.onnx]


@case("inspect-missing-checkpoint", "6", 2, "nothing")
def _(w, t):
    return ["inspect", t / "nothing"]


# -- the runner --------------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): type and, for files, size and sha256."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            else:
                out[rel] = (stat.S_IFMT(st.st_mode),)
    return out


@contextmanager
def _guards(seconds: float, fsize: int | None):
    """A hang becomes a TimeoutError; `fsize` is RLIMIT_FSIZE (Python ignores SIGXFSZ: writes fail EFBIG)."""
    def hung(*_):
        raise TimeoutError(f"the command did not finish in {seconds:.0f}s")

    old_handler = signal.signal(signal.SIGALRM, hung)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, old_limit[1]))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)


def _record(c: Case, result) -> None:
    """HARDENING_RECORD=FILE: one JSON line per case (exit code and error line), for the issue's table."""
    where = os.environ.get("HARDENING_RECORD")
    if where:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        exc = result.exception
        with open(where, "a") as f:
            f.write(json.dumps({"case": c.id, "section": c.section, "exit": result.exit_code,
                                "exception": None if exc is None or isinstance(exc, SystemExit) else type(exc).__name__,
                                "line": (errors or [""])[-1][:200]}) + "\n")


def _leftovers(folder: Path, before: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in before)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_case(c: Case, world: World, tmp_path, monkeypatch):
    t = tmp_path / "case"
    t.mkdir()
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.chdir(t)
    made = c.make(world, t)
    argv, check = made if isinstance(made, tuple) else (made, None)
    case_before, world_before = _snapshot(t), _snapshot(world.root)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # every temporary file of the command lands here
    with _guards(180, c.fsize):
        result = CliRunner().invoke(main, [str(a) for a in argv])
    monkeypatch.undo()
    _record(c, result)
    out = result.output
    assert "Traceback" not in out and (result.exception is None or isinstance(result.exception, SystemExit)), \
        f"unhandled {type(result.exception).__name__}: {result.exception}\n{out}"
    assert result.exit_code == c.code, out
    lines = [line for line in out.splitlines() if line.strip()]
    if c.code:
        assert len(lines) == 1 and lines[0].startswith("error: "), out
        for word in c.says:
            assert word.lower() in lines[0].lower(), lines[0]
        assert _snapshot(t) == case_before, "a failing command created or changed files"
    else:
        for word in c.says:
            assert word.lower() in out.lower(), out
        after = _snapshot(t)
        changed = {k for k in set(after) | set(case_before) if after.get(k) != case_before.get(k)}
        assert all(k.split("/")[0] in c.writes for k in changed), sorted(changed)
    assert not _leftovers(t, {k for k in case_before if "/" not in k}), "temporary left behind"
    assert not list(private_tmp.iterdir()), "temporary file left behind"
    assert _snapshot(world.root) == world_before, "an input outside the case folder changed"
    if check is not None:
        check(world, t, result)


def test_every_section_of_the_issue_has_cases():
    assert {c.section for c in CASES} == {"1", "2", "3", "4", "5", "6"}
    assert len({c.id for c in CASES}) == len(CASES)


# -- cases that need real processes -------------------------------------------------------------------------
def _cli(*args, limits: dict | None = None, **kw) -> subprocess.Popen:
    """`python -m edgesvd ARGS` in a new process, with optional resource limits."""
    def preexec():
        for key, value in (limits or {}).items():
            resource.setrlimit(key, (value, value))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgesvd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec, env=env, **kw)


def test_two_concurrent_writers_of_one_out(world, tmp_path):
    """Two runs writing the same --out at once: one writes it, the other fails with one line and
    replaces nothing."""
    # whiten reads calibration text for seconds after the start-up check: both runs work at once.
    procs = [_cli("compress", world.llama, *WHITEN, "--calib-samples", "64", "--out", "same", cwd=tmp_path)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    lines = [line for line in (loser[1] + loser[2]).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "same" in lines[0], lines
    assert "Traceback" not in loser[2]
    assert _json(tmp_path / "same" / "config.json")["edgesvd"]["method"] == "whiten"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"], "a temporary folder was left behind"


def test_a_second_writer_meets_the_first_ones_lock_or_its_result(world, tmp_path):
    """Deterministic forms of the race above. While one writer holds an output's temporary, the CLI
    writing the same --out fails with one line naming it; and an output that appears while a writer
    works is never replaced by it (the later writer fails; what the first wrote stays)."""
    from edgesvd.errors import OutputExistsError
    from edgesvd.outputs import atomic_output_dir

    out = tmp_path / "same"
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "first.txt").write_text("first\n")
        r = CliRunner().invoke(main, ["compress", str(world.llama), *FAST, "--out", str(out)])
        assert r.exit_code == 2 and r.output.startswith("error: ") and "writing" in r.output, r.output
        assert not out.exists()
    assert (out / "first.txt").read_text() == "first\n"
    other = tmp_path / "other"
    with pytest.raises(OutputExistsError, match="other"):
        with atomic_output_dir(other, force=False) as tmp:
            (tmp / "late.txt").write_text("late\n")
            other.mkdir()
            (other / "early.txt").write_text("early\n")  # another process finished first
    assert sorted(p.name for p in other.iterdir()) == ["early.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "same"], "a temporary was left behind"


def test_a_killed_runs_temporary_is_removed_and_a_users_folder_is_not(world, tmp_path):
    """SIGKILL leaves edgesvd's marked temporary behind: the next run removes it, and leaves alone a
    user's folder that merely looks like one."""
    code = ("import sys, time; from edgesvd.outputs import atomic_output_dir\n"
            "with atomic_output_dir(sys.argv[1], force=False) as tmp:\n"
            "    (tmp / 'half-written').write_text('x'); print('ready', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ox")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    user = tmp_path / f".ox.{proc.pid}.mine"  # named like a temporary of the dead process
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    killed = [p for p in tmp_path.iterdir() if p.name.startswith(".ox.") and p != user]
    assert killed, "the killed run left no temporary to clean"
    r = CliRunner().invoke(main, ["compress", str(world.llama), *FAST, "--out", str(tmp_path / "ox")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ox", user.name])
    assert (user / "notes.txt").read_text() == "mine\n"


def test_a_17_mb_single_line_calibration_file_is_fast_and_small(world, tmp_path):
    """The whole file is one sentence: only the head of each sample is tokenized (under a 3 GB
    address-space limit, where tokenizing 512 copies of it whole took > 11 GB)."""
    line = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * 320_000)[:17_000_000]
    (tmp_path / "one-line.txt").write_text(line + "\n")
    proc = _cli("compress", world.bert, "--method", "whiten", "--calib", tmp_path / "one-line.txt", "--quiet",
                "--out", tmp_path / "ck", cwd=tmp_path, limits={resource.RLIMIT_AS: 3 << 30})
    try:
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    out, err = proc.communicate()
    assert code == 0, err[-2000:]
    assert _json(tmp_path / "ck" / "config.json")["edgesvd"]["calibration"]["num_sequences"] == 512
