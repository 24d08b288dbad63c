"""Bundles: pack an exported model with its reports, runner and manifest into a folder and a .tar.gz."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path

from edgesvd.checkpoint import library_versions as core_versions
from edgesvd.checkpoint import read_record
from edgesvd.errors import BundleError, ConfigError
from edgesvd.loading import check_model_folder, model_path
from edgesvd.outputs import atomic_output_dir, check_output_dir

from .export import MODEL_FILE, onnx_files_bytes, read_export
from .manifest import SCHEMA_VERSION, file_table, sha256_file, write_manifest, write_tarball
from .parity import ParityConfig, verify
from .profiling import ProfileConfig, profile
from .report import write_report

RUNNER = "run.py"
# Files of the exported folder that a bundle carries (the graph, its data, configs, tokenizer).
_CARRIED_SUFFIXES = (".onnx", ".onnx_data", ".data", ".json", ".txt", ".model")


def _weights_sha(folder: Path) -> str | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return sha256_file(folder / name)
    return None


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
        write_manifest(tmp, manifest)  # the HTML report reads it
        write_report(tmp)
        manifest["files"] = file_table(tmp)
        write_manifest(tmp, manifest)
        write_tarball(tmp, tarball, out.name)
    return out


def _read_report(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read report {path}: {exc}") from exc


def pack_export(onnx_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                parity_report: str | os.PathLike | None = None, profile_report: str | os.PathLike | None = None,
                runs: int = 20, force: bool = False) -> Path:
    """`edgesvd pack`: bundle an export, with the checkpoint recorded at export unless given, and
    the parity and latency reports read from `verify --json` / `profile --json` files or measured
    now. A parity report that records a failure is refused."""
    onnx_dir = Path(onnx_dir)
    meta = read_export(onnx_dir)
    checkpoint = Path(checkpoint) if checkpoint else Path(meta["source"])
    if parity_report:
        parity = _read_report(parity_report)
        if not parity.get("ok"):
            raise ConfigError(f"{parity_report} records a failed parity check; refusing to pack")
    else:
        parity = verify(checkpoint, onnx_dir, ParityConfig()).to_json()
    prof = _read_report(profile_report) if profile_report else profile(onnx_dir, None, ProfileConfig(runs=runs)).to_json()
    return pack(onnx_dir, checkpoint, out, parity, prof, force=force)


