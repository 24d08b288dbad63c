"""Pack an exported model into a deployable bundle (folder + .tar.gz, manifest with sha256) and check one."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from edgesvd.checkpoint import atomic_output_dir, check_output_dir, read_record
from edgesvd.loading import check_model_folder, embedded_model_path

from .errors import BundleError
from .onnx_export import MODEL_FILE, onnx_files_bytes, read_export
from .report import write_report

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RUNNER = "run.py"
# Files of the exported folder that a bundle carries (the graph, its data, configs, tokenizer).
_CARRIED_SUFFIXES = (".onnx", ".onnx_data", ".data", ".json", ".txt", ".model")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_sha(folder: Path) -> str | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return sha256_file(folder / name)
    return None


def _source_info(source_model: str) -> dict:
    """The source model's reference, folder and weights sha256, without touching the network."""
    if source_model == "minilm":
        path = embedded_model_path()
    else:
        path = Path(source_model).expanduser()
    try:
        check_model_folder(path)
    except Exception:
        return {"model": source_model, "path": None, "sha256": None,
                "note": "source folder not available locally when packing"}
    return {"model": source_model, "path": str(path.resolve()), "sha256": _weights_sha(path)}


def library_versions() -> dict:
    """The core's library versions plus the ONNX side's (read from package metadata)."""
    from importlib.metadata import version

    import onnxruntime

    from edgesvd.checkpoint import library_versions as core_versions

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


def _file_table(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def pack(onnx_dir: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike,
         parity: dict | None = None, profile: dict | None = None, session: dict | None = None,
         force: bool = False, extra: dict | None = None) -> Path:
    """Write the bundle folder `out` and `out`.tar.gz; returns the folder. Reports are JSON dicts."""
    onnx_dir, checkpoint, out = Path(onnx_dir), Path(checkpoint), Path(out)
    tarball = out.with_name(out.name + ".tar.gz")
    check_output_dir(out, force)
    check_output_dir(tarball, force)
    meta = read_export(onnx_dir)
    raw_config, record = read_record(checkpoint)
    if meta["kind"] != "compressed":
        raise BundleError(f"{onnx_dir} is a dense export; pack a compressed one")
    parity, profile = _portable(parity), _portable(profile)
    providers = sorted({r["provider"] for r in parity["results"] if r["status"] == "passed"}) if parity else ["CPUExecutionProvider"]
    with atomic_output_dir(out, force) as tmp:
        for p in sorted(onnx_dir.iterdir()):
            if p.is_file() and p.name.endswith(_CARRIED_SUFFIXES):
                shutil.copy2(p, tmp / p.name)
        shutil.copy2(Path(__file__).with_name("runner_template.py"), tmp / RUNNER)
        (tmp / "reports").mkdir()
        if (checkpoint / "spectrum.safetensors").is_file():  # singular values/scores for the HTML report
            shutil.copy2(checkpoint / "spectrum.safetensors", tmp / "reports" / "spectrum.safetensors")
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # the HTML report reads it
        write_report(tmp)
        manifest["files"] = _file_table(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _write_tarball(tmp, tarball, out.name)
    return out


def _write_tarball(folder: Path, tarball: Path, arcname: str) -> None:
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
    manifest_file = bundle / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"no {MANIFEST} in {bundle}")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"malformed {manifest_file}: {exc}") from exc
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
