"""The code's shape: no import cycles, the core never imports the exporters, nothing imports the CLI,
and the installed names stay under the `edgesvd` namespace (editable and wheel installs)."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgesvd", "edgesvd.cli", "edgesvd.exporters", "edgesvd.builtin_profiles")


def _modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name (found where the import system finds them,
    so the exporters/ and profiles/ folders count under their installed names)."""
    found = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, package
        folder = Path(next(iter(spec.submodule_search_locations)))
        for file in folder.glob("*.py"):
            found[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return found


def _imports(name: str, file: Path, known: set[str]) -> set[str]:
    """edgesvd modules `file` imports anywhere (module level or inside functions)."""
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module pkg.mod when there is one, else names of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, set(modules)) for name, file in modules.items()}


def test_the_import_graph_has_no_cycle(graph):
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # the message lists the modules of the cycle
        pytest.fail(f"import cycle: {' → '.join(exc.args[1])}")
    assert len(order) == len(graph) > 30


def test_the_core_never_imports_the_exporters_and_nothing_imports_the_cli(graph):
    core = [m for m in graph if not m.startswith(("edgesvd.exporters", "edgesvd.cli")) and m != "edgesvd.__main__"]
    assert "edgesvd.compression" in core and "edgesvd.exporters.deploy" in graph
    for module in core:
        bad = {d for d in graph[module] if d.startswith(("edgesvd.exporters", "edgesvd.cli"))}
        assert not bad, f"{module} imports {sorted(bad)}"
    for module, deps in graph.items():
        if not module.startswith("edgesvd.cli") and module != "edgesvd.__main__":
            assert not any(d.startswith("edgesvd.cli") for d in deps), f"{module} imports the CLI"


def _python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_installed_names_are_namespaced(tmp_path):
    """From a folder outside the checkout: edgesvd.exporters and the profile data import; the
    generic names `exporters` and `profiles` are free."""
    ok = _python("import edgesvd.exporters.deploy, edgesvd.profiles as p; print(len(p.builtin_names()))", tmp_path)
    assert ok.returncode == 0 and int(ok.stdout) >= 9, ok.stderr
    for name in ("exporters", "profiles"):
        free = _python(f"import {name}", tmp_path)
        assert free.returncode != 0 and "No module named" in free.stderr, (name, free.stdout)


def test_a_wheel_installs_everything_under_edgesvd(tmp_path):
    """The non-editable install: the wheel holds edgesvd/exporters/*.py and the profile TOML files
    under edgesvd/, nothing at the top level but edgesvd, and imports from where it is unpacked."""
    source = tmp_path / "source"  # building writes build/ and *.egg-info beside pyproject.toml: use a copy
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, source / part)
    for part in ("edgesvd", "exporters", "profiles"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("edgesvd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("edgesvd-")} == {"edgesvd"}
    assert "edgesvd/exporters/deploy.py" in names and "edgesvd/exporters/profile_worker.py" in names
    assert "edgesvd/builtin_profiles/raspberry-pi-5.toml" in names and "edgesvd/cli/__init__.py" in names
    # the built-in calibration corpus travels with its attribution file
    assert {"edgesvd/corpus/natural_en.txt", "edgesvd/corpus/ATTRIBUTION.md"} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    where = _python("import edgesvd.exporters.export as e, edgesvd.profiles as p, edgesvd.calibration as c; "
                    "print(e.__file__); print(p.builtin_dir()); assert len(c.builtin_documents()) == 952",
                    tmp_path, env)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(tmp_path / "site")) for line in where.stdout.split()), where.stdout


def test_ruff_finds_no_undefined_or_unused_names_and_imports_are_sorted():
    """`ruff check` with the rules of pyproject.toml (pyflakes, syntax errors, import order)."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed (it comes with the [dev] extra)")
    result = subprocess.run([str(ruff), "check", "--no-cache", "edgesvd", "exporters", "tests", "samples"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_readme_lists_every_module():
    """The README's "How the code is laid out" tree names every module of the core and the exporters."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- section:layout -->"):]
    section = section[:section.index("<!-- section:", 10)]
    missing = [f"{p.parent.name}/{p.name}" for folder in ("edgesvd", "exporters")
               for p in sorted((ROOT / folder).glob("*.py")) if f"  {p.name} " not in section]
    assert not missing, f"modules missing from the README's layout section: {missing}"
