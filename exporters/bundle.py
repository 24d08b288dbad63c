"""Bundles: pack an exported model with its reports, runner and manifest into a folder and a .tar.gz."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import stat
from importlib.metadata import version
from pathlib import Path

from edgesvd.checkpoint import INDEX, SPECTRUM, WEIGHTS, read_record, weight_files
from edgesvd.checkpoint import library_versions as core_versions
from edgesvd.errors import BundleError, CheckpointError, ConfigError, InputFileError
from edgesvd.inputs import kind_of, open_regular, read_json
from edgesvd.loading import check_model_folder, model_path
from edgesvd.outputs import atomic_output_dir, check_output_dir, check_output_file

from .export import MODEL_FILE, onnx_files_bytes, read_export
from .manifest import (
    SCHEMA_VERSION,
    file_table,
    load_signing_key,
    sha256_file,
    sign_bundle,
    write_manifest,
    write_tarball,
)
from .parity import REPORT_SCHEMA as PARITY_SCHEMA
from .parity import ParityConfig, verify
from .profiling import REPORT_SCHEMA as PROFILE_SCHEMA
from .profiling import ProfileConfig, profile
from .report import write_report

RUNNER = "run.py"
# Files of the exported folder that a bundle carries (the graph, its data, configs, tokenizer).
_CARRIED_SUFFIXES = (".onnx", ".onnx_data", ".data", ".json", ".txt", ".model")


def carried_files(onnx_dir: Path) -> list[Path]:
    """The files of an export folder a bundle carries, each a regular file: a symbolic link (even
    one that stays inside), a pipe or a device there is refused, so a bundle holds only bytes the
    export wrote and never the target of a link."""
    carried = []
    for path in sorted(Path(onnx_dir).iterdir()):
        if path.name.endswith(_CARRIED_SUFFIXES):
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                raise InputFileError(f"bundle input {path} is {kind_of(mode)}, not a regular file: a bundle "
                                     "carries only regular files that `edgesvd export` wrote")
            carried.append(path)
    return carried


def _spectrum_of(checkpoint: Path) -> Path | None:
    """The checkpoint's spectrum.safetensors (a regular file), or None."""
    path = checkpoint / SPECTRUM
    if not os.path.lexists(path):
        return None
    mode = path.lstat().st_mode
    if not stat.S_ISREG(mode):
        raise InputFileError(f"bundle input {path} is {kind_of(mode)}, not a regular file")
    return path


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy a regular file without following a link (one swapped in after the check is refused too)."""
    with open_regular(src, "bundle input", follow_symlinks=False) as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


def _weights_sha(folder: Path) -> str | None:
    """sha256 of model.safetensors; of weights in parts, the sha256 of the index followed by every
    part's sha256 in name order (the index alone names the parts but does not cover their bytes)."""
    try:
        files = weight_files(folder)
    except CheckpointError:
        return None
    if files == [folder / WEIGHTS]:
        return sha256_file(files[0])
    digest = hashlib.sha256((folder / INDEX).read_bytes())
    for f in files:
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def _source_info(source_model: str) -> dict:
    """The source model's reference, folder and weights sha256, without touching the network."""
    try:
        path = model_path(source_model)[0] if source_model == "minilm" else Path(source_model).expanduser()
        check_model_folder(path)
    except Exception:
        return {"model": source_model, "path": None, "sha256": None,
                "note": "source folder not available locally when packing"}
    return {"model": source_model, "path": str(path.resolve()), "sha256": _weights_sha(path)}


def library_versions() -> dict:
    """The core's library versions plus the ONNX side's (read from package metadata)."""
    import onnxruntime

    return {**core_versions(), "optimum": version("optimum"), "optimum-onnx": version("optimum-onnx"),
            "onnx": version("onnx"), "onnxruntime": onnxruntime.__version__}


def _portable(report: dict | None) -> dict | None:
    """A report with machine-local folder paths reduced to their names (bundles move between hosts)."""
    if report is None:
        return None
    report = json.loads(json.dumps(report))
    for key in ("onnx_dir", "checkpoint"):
        if isinstance(report.get(key), str):
            report[key] = Path(report[key]).name
    return report


def _parity_summary(parity: dict | None) -> dict | None:
    if parity is None:
        return None
    return {"ok": parity["ok"], "precision": parity["precision"],
            "providers": {r["provider"]: {"status": r["status"], "reason": r["reason"], "failures": r["failures"],
                                         **{k: r[k] for k in ("top1", "generation", "embedding_cosine") if r.get(k) is not None},
                                         "min_cosine": min((m["cosine"] for m in r["outputs"].values()), default=None)}
                          for r in parity["results"]}}


def _latency_summary(profile: dict | None) -> dict | None:
    if profile is None:
        return None
    per_model = {}
    for m in profile["measurements"]:
        per_model.setdefault(m["model"], {})[m["provider"]] = {
            mode: {k: s[k] for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s")} for mode, s in m["modes"].items()}
    shape = {k: profile["config"][k] for k in ("batch", "seq_len", "runs", "warmup")}
    return {"shape": shape, "models": per_model, "comparisons": profile["comparisons"]}


def markdown_report(manifest: dict) -> str:
    """A human-readable report of what is in the bundle and how it measured."""
    comp, model = manifest["compression"], manifest["model"]
    lines = [f"# edgesvd bundle — {manifest['source']['model']}", "",
             f"- family: {model['family']} ({model['model_type']}), task `{model['task']}`, "
             f"precision {model['precision']}, opset {model['opset']}",
             f"- method `{comp['method']}`, keep {comp['keep_actual']:.3f} (requested {comp['keep_requested']}), "
             f"{sum(r is not None for r in comp['ranks'].values())}/{len(comp['ranks'])} layers factorized",
             f"- ONNX bytes: {manifest['onnx_bytes']:,}", ""]
    parity = manifest.get("parity")
    if parity:
        lines += ["## Parity (ONNX vs compressed PyTorch)", "", "| provider | status | min cosine | detail |",
                  "|---|---|---|---|"]
        for prov, r in parity["providers"].items():
            cos = f"{r['min_cosine']:.6f}" if r.get("min_cosine") is not None else "–"
            detail = r["reason"] or "; ".join(r["failures"]) or ", ".join(
                f"{k} {r[k]:.4f}" for k in ("top1", "generation", "embedding_cosine") if k in r)
            lines.append(f"| {prov} | {r['status']} | {cos} | {detail} |")
        lines.append("")
    lat = manifest.get("latency")
    if lat:
        s = lat["shape"]
        lines += [f"## Latency (batch {s['batch']}, sequence {s['seq_len']}, {s['runs']} runs after {s['warmup']} warm-up)",
                  "", "| model | provider | mode | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for label, provs in lat["models"].items():
            for prov, modes in provs.items():
                for mode, st in modes.items():
                    lines.append(f"| {label} | {prov} | {mode} | {st['p50_ms']:.2f} | {st['p90_ms']:.2f} | {st['p99_ms']:.2f} |")
        for c in lat["comparisons"]:
            lines.append("")
            lines.append(f"{c['provider']} {c['mode']}: speedup {c['speedup']:.2f}× (FLOP bound {c['flop_bound_speedup']:.2f}×)")
        lines.append("")
    lines += ["## Run it", "", "```", "pip install onnxruntime numpy tokenizers", f"python {RUNNER} \"some text\"", "```", ""]
    return "\n".join(lines)


def _tarball(out: Path) -> Path:
    return out.with_name(out.name + ".tar.gz")


def pack(onnx_dir: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike,
         parity: dict | None = None, profile: dict | None = None, session: dict | None = None,
         force: bool = False, extra: dict | None = None, sign_key=None) -> Path:
    """Write the bundle folder `out` and `out`.tar.gz; returns the folder. Reports are JSON dicts;
    `sign_key`: an Ed25519 private key (or the path of its PEM file) that signs the manifest."""
    onnx_dir, checkpoint, out = Path(onnx_dir), Path(checkpoint), Path(out)
    check_output_dir(out, force, inputs=(onnx_dir, checkpoint))
    check_output_file(_tarball(out), force)
    if isinstance(sign_key, (str, os.PathLike)):
        sign_key = load_signing_key(sign_key)
    meta = read_export(onnx_dir)
    raw_config, record = read_record(checkpoint)
    if meta["kind"] != "compressed":
        raise BundleError(f"{onnx_dir} is a dense export; pack a compressed one")
    carried, spectrum = carried_files(onnx_dir), _spectrum_of(checkpoint)
    parity, profile = _portable(parity), _portable(profile)
    providers = sorted({r["provider"] for r in parity["results"] if r["status"] == "passed"}) if parity else ["CPUExecutionProvider"]
    with atomic_output_dir(out, force, inputs=(onnx_dir, checkpoint)) as tmp:
        for path in carried:
            _copy_regular(path, tmp / path.name)
        shutil.copy2(Path(__file__).with_name("runner_template.py"), tmp / RUNNER)
        (tmp / "reports").mkdir()
        if spectrum is not None:  # singular values/scores for the HTML report
            _copy_regular(spectrum, tmp / "reports" / SPECTRUM)
        if parity:
            (tmp / "reports" / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
        if profile:
            (tmp / "reports" / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"family": meta["family"], "model_type": meta["model_type"], "task": meta["task"],
                      "precision": meta["precision"], "opset": meta["opset"], "file": MODEL_FILE,
                      "eos_token_id": raw_config.get("eos_token_id")},
            "source": _source_info(record.source_model),
            "checkpoint": {"name": checkpoint.name, "sha256": _weights_sha(checkpoint)},
            "compression": {"method": record.method, "keep_requested": record.keep_requested,
                            "keep_actual": record.keep_actual, "rank_multiple": record.rank_multiple,
                            "ranks": record.ranks(), "calibration": record.calibration},
            "graph_check": meta.get("graph_check"),
            "onnx_bytes": onnx_files_bytes(tmp),
            "parity": _parity_summary(parity),
            "latency": _latency_summary(profile),
            "versions": library_versions(),
            "runtime": {"execution_providers": providers,
                        "session_options": session or (profile or {}).get("config", {}).get("session")},
        }
        manifest.update(extra or {})  # more top-level sections, e.g. `budgets` from `edgesvd run --profile`
        (tmp / "reports" / "report.md").write_text(markdown_report(manifest))
        (tmp / "reports" / "report.json").write_text(json.dumps(
            {k: manifest[k] for k in ("model", "source", "compression", "parity", "latency")}, indent=2) + "\n")
        write_manifest(tmp, manifest)  # the HTML report reads it
        write_report(tmp)
        manifest["files"] = file_table(tmp)
        write_manifest(tmp, manifest)
        if sign_key is not None:
            sign_bundle(tmp, sign_key)
        write_tarball(tmp, _tarball(out), out.name, force)
    return out


def pack_export(onnx_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                parity_report: str | os.PathLike | None = None, profile_report: str | os.PathLike | None = None,
                runs: int = 20, force: bool = False, sign: str | os.PathLike | None = None) -> Path:
    """`edgesvd pack`: bundle an export, with the checkpoint recorded at export unless given, and
    the parity and latency reports read from `verify --json` / `profile --json` files or measured
    now; with `sign`, the manifest is signed with that PEM Ed25519 private key. Everything that
    can be refused (inputs, reports, key, output) is, before anything is measured. A parity report
    that records a failure is refused."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    meta = read_export(onnx_dir)
    checkpoint = Path(checkpoint) if checkpoint else Path(meta["source"])
    check_output_dir(out, force, inputs=(onnx_dir, checkpoint))
    check_output_file(_tarball(out), force)
    read_record(checkpoint)
    carried_files(onnx_dir)
    _spectrum_of(checkpoint)
    key = load_signing_key(sign) if sign is not None else None
    parity = read_json(parity_report, "parity report", PARITY_SCHEMA) if parity_report else None
    prof = read_json(profile_report, "profile report", PROFILE_SCHEMA) if profile_report else None
    if parity is not None and not parity["ok"]:
        raise ConfigError(f"{parity_report} records a failed parity check; refusing to pack")
    if parity is None:
        parity = verify(checkpoint, onnx_dir, ParityConfig()).to_json()
    if prof is None:
        prof = profile(onnx_dir, None, ProfileConfig(runs=runs)).to_json()
    return pack(onnx_dir, checkpoint, out, parity, prof, force=force, sign_key=key)


