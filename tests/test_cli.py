"""CLI: compress and inspect work end to end; every bad input gives one line, exit 2, no output."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from edgesvd.cli import main

FAST = ["--calib-samples", "4", "--calib-len", "16", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, needle: str, code: int = 2):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_compress_and_inspect(tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    result = run("compress", tiny_llama_dir, "--method", "whiten", "--keep", "0.5", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["edgesvd"]["method"] == "whiten" and config["model_type"] == "llama"
    shown = run("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert "model.layers.0.self_attn.q_proj" in shown.output and "total" in shown.output
    # An existing output folder is refused, and left untouched, unless --force.
    before = sorted(p.name for p in out.iterdir())
    again = run("compress", tiny_llama_dir, "--out", out, "--method", "plain", *FAST)
    assert_one_line_error(again, "exists")
    assert sorted(p.name for p in out.iterdir()) == before
    forced = run("compress", tiny_llama_dir, "--out", out, "--method", "plain", "--force", *FAST)
    assert forced.exit_code == 0 and json.loads((out / "config.json").read_text())["edgesvd"]["method"] == "plain"


def test_progress_in_a_log_is_plain_lines(tiny_llama_dir, tmp_path):
    """Written to a file (not a terminal), progress is a line per stage when it ends, not a bar
    drawn once at the end."""
    result = run("compress", tiny_llama_dir, "--method", "whiten", "--out", tmp_path / "ck",
                 *[a for a in FAST if a != "--quiet"])
    assert result.exit_code == 0, result.output
    done = re.findall(r"^(\S[^:]*): (\d+)/(\d+) \(\d+ s\)$", result.output, re.M)
    assert done and all(n == total for _, n, total in done), result.output
    assert "━" not in result.output


def _bad_model_folders(tmp_path, tiny_llama_dir):
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_llama_dir, no_config)
    (no_config / "config.json").unlink()
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    pickle_only = tmp_path / "pickle-only"
    shutil.copytree(no_weights, pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello")
    return [(tmp_path / "missing", "does not exist"), (a_file, "not a folder"), (no_config, "no config.json"),
            (no_weights, "no model.safetensors"), (pickle_only, "pickle")]


def test_bad_models(tiny_llama_dir, tmp_path):
    for path, needle in _bad_model_folders(tmp_path, tiny_llama_dir):
        out = tmp_path / "out"
        assert_one_line_error(run("compress", path, "--out", out, *FAST), needle)
        assert not out.exists()


@pytest.mark.parametrize("keep", ["0", "-0.1", "1.5"])
def test_keep_out_of_range(tiny_llama_dir, tmp_path, keep):
    assert_one_line_error(run("compress", tiny_llama_dir, "--keep", keep, "--out", tmp_path / "o", *FAST), "keep")
    assert not (tmp_path / "o").exists()


def test_bad_calibration(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    unreadable = tmp_path / "dir.txt"
    unreadable.mkdir()  # a folder named like a file, holding nothing readable
    cases = [(tmp_path / "missing.txt", "does not exist"), (empty, "contains no text"),
             (bad_jsonl, "no string 'text' field"), (unreadable, "no .txt or .jsonl files")]
    for source, needle in cases:
        out = tmp_path / "out"
        result = run("compress", tiny_llama_dir, "--method", "whiten", "--calib", source, "--out", out, *FAST)
        assert_one_line_error(result, needle)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_no_targetable_linear(tiny_llama_dir, tmp_path):
    result = run("compress", tiny_llama_dir, "--exclude", "*", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(result, "no Linear layer to compress")


def test_inspect_rejects_non_checkpoint(tiny_llama_dir, tmp_path):
    assert_one_line_error(run("inspect", tiny_llama_dir), "not an edgesvd checkpoint")
    assert_one_line_error(run("inspect", tmp_path / "nothing"), "not a folder")


def test_calibration_sources_jsonl_and_folder(tiny_llama_dir, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n\nAnother paragraph of text.")
    (folder / "b.jsonl").write_text(json.dumps({"text": "A record with some words in it."}) + "\n")
    from edgesvd.calibration import read_documents

    assert read_documents(str(folder)) == ["The quick brown fox jumps over the lazy dog.",
                                          "Another paragraph of text.", "A record with some words in it."]
    result = run("compress", tiny_llama_dir, "--calib", folder, "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["edgesvd"]["calibration"]["documents"] == 3


def test_the_rank_multiple_is_checked_against_the_break_even_of_the_form(tiny_llama_dir, tmp_path):
    """Rank 48 is above every plain break-even of the tiny decoder (at most 45.7, its 160×64 MLP) but
    below the pivoted ones (64): the decoder's default form takes it, --form plain refuses it."""
    args = ["compress", tiny_llama_dir, "--method", "whiten", "--rank-multiple", "48", *FAST]
    ok = run(*args, "--out", tmp_path / "pivoted")
    assert ok.exit_code == 0, ok.output
    layers = json.loads((tmp_path / "pivoted" / "config.json").read_text())["edgesvd"]["layers"]
    assert any(l["rank"] == 48 and l["pivoted"] for l in layers)
    assert_one_line_error(run(*args, "--form", "plain", "--out", tmp_path / "plain"), "break-even")
    assert not (tmp_path / "plain").exists()
