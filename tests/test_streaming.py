"""Block-streamed compression (edgesvd.streaming) and GGUF intake (edgesvd.gguf_intake): the streamed
factors equal the whole-model ones, dense weights are never held for more than one block, the
checkpoint round-trips, and a GGUF file written here by the gguf package compresses end to end."""

from __future__ import annotations

import gc
import importlib.util
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from edgesvd.calibration import CalibrationConfig
from edgesvd.checkpoint import load_compressed, read_weights
from edgesvd.cli import main
from edgesvd.compression import compress, compress_streamed
from edgesvd.device import calibration_matmuls, native_bf16
from edgesvd.errors import CheckpointError, ConfigError, DeviceError, ModelLoadError
from edgesvd.factorize import LowRankLinear
from edgesvd.loading import resolve_model
from edgesvd.methods import Asvd, Learned, Plain, Whiten
from edgesvd.reporting import Bar, Reporter
from edgesvd.statistics import ActivationStats, accumulate
from edgesvd.streaming import use_streaming

# Explicit text: the whole-model path of a decoder would otherwise sample its own (`self`), which the
# streamed path cannot.
CALIB = CalibrationConfig(source="builtin", num_sequences=24, seq_len=48)


def _same_models(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:5]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [(l.name, l.rank) for l in a.record.layers] == [(l.name, l.rank) for l in b.record.layers]
    assert a.spectra.keys() == b.spectra.keys()


@pytest.mark.parametrize("method", [Plain(keep=0.5), Whiten(keep=0.5)], ids=["plain", "whiten"])
def test_streamed_factors_equal_the_whole_model_path_on_stories260k(stories_dir, method):
    """Dense propagation gives every block the inputs the whole model gives it: the same Gram bits,
    the same factors (bit for bit), the same records."""
    whole = compress(stories_dir, method, calib=CALIB, stream="off")
    streamed = compress_streamed(resolve_model(stories_dir), method, CALIB, propagate="dense",
                                 calib_precision="float32")
    _same_models(whole, streamed)
    assert streamed.record.details["streamed"] is True and "streamed" not in whole.record.details


@pytest.mark.parametrize("method", [Asvd(keep=0.6), Whiten(keep=0.6)], ids=["asvd", "whiten"])
def test_streamed_factors_equal_the_whole_model_path_on_a_tied_qwen2(tiny_qwen2_dir, method):
    """A tied embedding/head and biased q/k/v: equal factors, and the head is the embedding again."""
    whole = compress(tiny_qwen2_dir, method, calib=CALIB, stream="off")
    streamed = compress_streamed(resolve_model(tiny_qwen2_dir), method, CALIB, propagate="dense",
                                 calib_precision="float32")
    _same_models(whole, streamed)
    m = streamed.model
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def test_compressed_propagation_calibrates_each_block_on_the_compressed_stream(tiny_llama_dir):
    """The default: block i+1's statistics come from the compressed block i, so its factors differ from
    the dense-propagation ones (block 0 sees the same inputs either way and is equal)."""
    src = resolve_model(tiny_llama_dir)
    dense = compress_streamed(src, Whiten(keep=0.5), CALIB, propagate="dense", calib_precision="float32")
    comp = compress_streamed(src, Whiten(keep=0.5), CALIB, calib_precision="float32")
    assert comp.record.details["propagate"] == "compressed"
    a, b = dense.model.state_dict(), comp.model.state_dict()
    assert torch.equal(a["model.layers.0.mlp.down_proj.a.weight"], b["model.layers.0.mlp.down_proj.a.weight"])
    assert not torch.equal(a["model.layers.1.mlp.down_proj.a.weight"], b["model.layers.1.mlp.down_proj.a.weight"])


def test_bfloat16_calibration_passes_change_the_factors_far_less_than_compression_does(stories_dir):
    """Under bf16 autocast (what 'auto' picks on a CPU with AMX) the ranks are the same and the logits 40×
    closer to the float32-calibrated model's than compression moves them (0.005 against 0.21 on
    stories260K). Where the CPU has no bf16 at all, 'auto' stays float32 and asking for bfloat16 is refused."""
    src = resolve_model(stories_dir)
    exact = compress_streamed(src, Whiten(keep=0.5), CALIB, calib_precision="float32")
    assert exact.record.details["calibration_precision"] == "float32"
    auto = compress_streamed(src, Whiten(keep=0.5), CALIB)
    cpu = torch.device("cpu")
    assert auto.record.details["calibration_precision"] == ("bfloat16" if native_bf16(cpu, matrix_units=True)
                                                            else "float32")
    if not native_bf16(cpu):
        with pytest.raises(DeviceError, match="no native bfloat16"):
            compress_streamed(src, Whiten(keep=0.5), CALIB, calib_precision="bfloat16")
        return
    fast = (auto if auto.record.details["calibration_precision"] == "bfloat16"  # AMX: auto already is bf16
            else compress_streamed(src, Whiten(keep=0.5), CALIB, calib_precision="bfloat16"))
    assert fast.record.details["calibration_precision"] == "bfloat16"
    assert [(l.name, l.rank) for l in fast.record.layers] == [(l.name, l.rank) for l in exact.record.layers]
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact_logits, fast_logits = exact.model(input_ids=ids).logits, fast.model(input_ids=ids).logits
        moved = (exact_logits - dense(input_ids=ids).logits).norm()
    gap = (fast_logits - exact_logits).norm()
    assert 0 < gap < 0.1 * moved, (float(gap), float(moved))


def test_the_gram_matrix_is_a_float32_product_even_under_the_bf16_autocast():
    """Autocast would round XᵀX itself to bf16 (2e-3 relative error here); statistics.accumulate keeps it a
    float32 product of at most bf16-rounded inputs (5e-4), and the context restores torch's settings."""
    x = torch.randn(2048, 96, generator=torch.Generator().manual_seed(0))
    exact = x.double().T @ x.double()
    before = torch.get_float32_matmul_precision()
    stats = ActivationStats()
    with calibration_matmuls("bfloat16", torch.device("cpu")):
        accumulate(stats, "g", x, None)
        assert torch.is_autocast_enabled("cpu")
        rounded = x.T @ x  # what autocast makes of the same product
    assert torch.get_float32_matmul_precision() == before and not torch.is_autocast_enabled("cpu")
    err = lambda g: float((g.double() - exact).norm() / exact.norm())  # noqa: E731
    assert rounded.dtype == torch.bfloat16 and stats.gram["g"].dtype == torch.float64
    assert err(stats.gram["g"]) < 1e-3 < err(rounded)


class _CountingReporter(Reporter):
    """At every finished block, counts the live dense MLP weights (real tensors of the dense
    gate/up/down shapes) among all objects Python holds: an independent look at what is resident;
    the factorized layers anywhere whose factors are resident; and, given the model's `hidden` size,
    the resident hidden-state tensors (batch × tokens × hidden: the calibration stream and its kin)."""

    def __init__(self, hidden: int | None = None) -> None:
        self.counts: list[int] = []
        self.factored: list[int] = []
        self.hidden = hidden
        self.streams: list[int] = []

    def progress(self, description, total):
        reporter = self

        class Counting(Bar):
            def advance(self, n=1):
                gc.collect()
                with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
                    warnings.simplefilter("ignore")
                    reporter.counts.append(sum(
                        1 for o in gc.get_objects()
                        if isinstance(o, torch.Tensor) and o.device.type != "meta"
                        and tuple(o.shape) in {(176, 64), (64, 176)}))
                    reporter.factored.append(sum(1 for o in gc.get_objects()
                                                 if isinstance(o, LowRankLinear) and o.a.weight.device.type != "meta"))
                    if reporter.hidden:
                        reporter.streams.append(sum(
                            1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"
                            and o.dim() == 3 and o.shape[-1] == reporter.hidden))

        from contextlib import contextmanager

        @contextmanager
        def bar():
            yield Counting()
        return bar()


def test_no_dense_block_weights_outlive_their_block(deep_llama_dir):
    """After each block, none of the 24 dense MLP weights is resident (a whole-model load would hold all
    of them from the start); the streamed model equals the whole-model one when propagation is dense."""
    reporter = _CountingReporter()
    streamed = compress_streamed(resolve_model(deep_llama_dir), Whiten(keep=0.5), CALIB, propagate="dense",
                                 calib_precision="float32",
                                 reporter=reporter)
    assert reporter.counts == [0] * 8, reporter.counts
    assert reporter.factored == [0] * 8, reporter.factored  # each finished block went to disk
    _same_models(compress(deep_llama_dir, Whiten(keep=0.5), calib=CALIB, stream="off"), streamed)
    assert len(streamed.record.details["rss_after_block_bytes"]) == 8
    assert streamed.record.details["peak_rss_bytes"] > 0


def test_a_streamed_checkpoint_round_trips(tiny_qwen2_dir, tmp_path):
    """Saved as one part per block (written while compressing) plus the rest, with an index; the
    tied embedding stored once; loads to the model compress returned; a missing part is one line."""
    result = compress(tiny_qwen2_dir, Whiten(keep=0.5), calib=CALIB, stream="on")
    out = result.save(tmp_path / "ck")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    parts = sorted(set(index.values()))
    assert parts == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] and not (out / "model.safetensors").exists()
    assert {f.name for f in out.glob("*.safetensors")} == {*parts, "spectrum.safetensors"}
    assert {n for n in index if "embed_tokens" in n or "lm_head" in n} == {"model.embed_tokens.weight"}
    assert all(index[n] == parts[0] for n in index if n.startswith("model.layers.0."))
    loaded, record = load_compressed(out)
    assert record.details["streamed"] is True and record.keep_actual < 0.6
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    (out / parts[1]).unlink()
    with pytest.raises(CheckpointError, match=f"names {parts[1]}, which is not in the checkpoint"):
        load_compressed(out)


def test_when_compress_streams(tiny_llama_dir, tiny_gpt2_dir, minilm_dir, monkeypatch):
    llama = resolve_model(tiny_llama_dir)
    assert not use_streaming(llama, Whiten(), "auto")  # a toy model loads whole
    assert use_streaming(llama, Whiten(), "on") and not use_streaming(llama, Whiten(), "off")
    monkeypatch.setattr("edgesvd.streaming.STREAM_ABOVE_BYTES", 1)
    assert use_streaming(llama, Whiten(), "auto")
    assert use_streaming(llama, Learned(), "auto")  # every method streams
    with pytest.raises(ConfigError, match="for decoders"):
        use_streaming(resolve_model(minilm_dir), Whiten(), "on")
    with pytest.raises(ConfigError, match="Conv1D"):
        compress(tiny_gpt2_dir, Plain(), stream="on")
    with pytest.raises(ConfigError, match="trust-remote-code"):
        compress(tiny_llama_dir, Plain(), stream="on", trust_remote_code=True)


def test_cli_stream_flag(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["compress", str(tiny_llama_dir), "--method", "whiten", "--keep", "0.5", "--stream", "on",
                              "--calib-samples", "16", "--calib-len", "32", "--out", str(tmp_path / "ck"), "--quiet"])
    assert ok.exit_code == 0, ok.output
    section = json.loads((tmp_path / "ck" / "config.json").read_text())["edgesvd"]
    assert section["details"]["streamed"] is True and section["details"]["propagate"] == "compressed"
    assert (tmp_path / "ck" / "model.safetensors.index.json").is_file()  # written block by block
    exported = runner.invoke(main, ["export", str(tmp_path / "ck"), "--out", str(tmp_path / "onnx")])
    assert exported.exit_code == 0, exported.output
    verified = runner.invoke(main, ["verify", str(tmp_path / "ck"), str(tmp_path / "onnx"), "--ep", "cpu"])
    assert verified.exit_code == 0 and "pass" in verified.output.lower(), verified.output
    bad = runner.invoke(main, ["compress", str(tiny_llama_dir), "--method", "whiten", "--stream", "on", "--calib", "self",
                               "--out", str(tmp_path / "ck2")])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error:") and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "ck2").exists()
    refused = runner.invoke(main, ["compress", str(tiny_llama_dir), "--method", "whiten", "--stream", "off",
                                   "--calib-precision", "bfloat16", "--out", str(tmp_path / "ck3")])
    assert refused.exit_code == 2 and refused.output.startswith("error:") and "streamed" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "ck3").exists()


# -- GGUF intake ----------------------------------------------------------------------------------------
def _write_tiny_gguf(path, bpe_tokenizer, leave_out=()):
    """A two-block Llama as llama.cpp writes it: llama.cpp tensor names, q/k rows in its rotary
    order, 2-D weights quantized to Q8_0, a gpt2-style BPE vocabulary with bos 1, eos 2, add_bos off
    (without the llama.cpp tensors named in `leave_out`)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads, kv_heads, layers = 4, 2, 2
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    spec = json.loads(bpe_tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def permute(t, n):  # transformers → llama.cpp rotary layout (transformers undoes it when loading)
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
    for i in range(layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts})
    state = model.state_dict()
    for hf, gg in names.items():
        if gg in leave_out:
            continue
        t = state[hf].numpy()
        t = permute(t, heads) if "q_proj" in hf else permute(t, kv_heads) if "k_proj" in hf else t
        if t.ndim == 2 and gg != "token_embd.weight":
            w.add_tensor(gg, gguf.quantize(t, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_gguf_file_is_dequantized_with_its_tokenizer_fixed_and_compresses(tmp_path, bpe_tokenizer, monkeypatch):
    """transformers' GGUF loader sets eos to the bos token and turns add_bos on; intake restores what
    the file says. The converted folder is cached by content and compresses like any model."""
    pytest.importorskip("accelerate", reason="GGUF intake needs the llm extra: pip install -e '.[llm]'")
    monkeypatch.setenv("EDGESVD_CACHE", str(tmp_path / "cache"))
    source_model = _write_tiny_gguf(tmp_path / "tiny.gguf", bpe_tokenizer)
    from edgesvd.loading import load_model, load_tokenizer

    src = resolve_model(tmp_path / "tiny.gguf")
    assert src.name == "tiny" and src.path.parent == tmp_path / "cache" / "gguf"
    tok = load_tokenizer(src.path)
    assert tok.eos_token_id == 2 and tok.eos_token == "</s>"
    assert tok("the cat")["input_ids"][0] != 1  # no bos prepended
    ids = torch.randint(4, 512, (1, 16))
    with torch.no_grad():
        delta = (load_model(src)(ids).logits - source_model(ids).logits).abs().max()
    assert delta < 0.05, delta  # Q8_0 noise; a wrong rotary permutation gives O(1)
    assert resolve_model(tmp_path / "tiny.gguf").path == src.path  # cached: not converted again
    result = compress(tmp_path / "tiny.gguf", Whiten(keep=0.5), calib=CalibrationConfig(num_sequences=8, seq_len=32),
                      stream="on")
    assert sum(l.rank is not None for l in result.record.layers) == 14


def test_gguf_conversion_goes_tensor_by_tensor_into_parts_and_equals_transformers_whole_model_loader(
        tmp_path, bpe_tokenizer, monkeypatch):
    """Parts and row slabs made tiny here so that the tiny model is written in several safetensors parts
    and its weights dequantized a few rows at a time; every tensor must still equal, bit for bit, what
    transformers' own loader (the whole model at once) makes of the same file."""
    pytest.importorskip("accelerate", reason="GGUF intake needs the llm extra: pip install -e '.[llm]'")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from edgesvd import gguf_intake
    from edgesvd.loading import load_model

    _write_tiny_gguf(tmp_path / "tiny.gguf", bpe_tokenizer)
    monkeypatch.setattr(gguf_intake, "PART_BYTES", 64 << 10)
    monkeypatch.setattr(gguf_intake, "CHUNK_BYTES", 4 << 10)
    out = tmp_path / "converted"
    out.mkdir()
    gguf_intake.convert(tmp_path / "tiny.gguf", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    parts = sorted(set(index["weight_map"].values()))
    assert len(parts) > 3 and not (out / "model.safetensors").exists()
    written = {}
    for part in parts:
        with safe_open(str(out / part), "pt") as f:
            written.update({k: f.get_tensor(k) for k in f.keys()})
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).state_dict()
    assert set(written) == set(reference) - {"lm_head.weight"}  # tied: stored once
    for name, tensor in written.items():
        assert torch.equal(tensor, reference[name]), name
    ids = torch.randint(4, 512, (1, 12))
    with torch.no_grad():
        model = load_model(resolve_model(out))
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()(ids).logits)


def test_bad_gguf_references_are_one_line_errors(tmp_path, monkeypatch, bpe_tokenizer):
    monkeypatch.setenv("EDGESVD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF file|needs the package"):
        resolve_model(tmp_path / "junk.gguf")
    if importlib.util.find_spec("accelerate") is not None:
        _write_tiny_gguf(tmp_path / "short.gguf", bpe_tokenizer, leave_out={"blk.1.ffn_down.weight"})
        with pytest.raises(ModelLoadError, match=r"lacks 1 of the llama model's tensors \(e.g. model.layers.1.mlp"):
            resolve_model(tmp_path / "short.gguf")
        assert not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-converted is left behind


# -- torch.distributed ------------------------------------------------------------------------------------
def test_two_gloo_processes_under_torchrun_write_the_single_process_checkpoint(tiny_llama_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m edgesvd compress … --stream on`: two real processes (gloo) share
    the calibration batches and sum their Gram matrices; rank 0 writes a checkpoint equal to the
    single-process one (float tolerance: the sums are added in another order)."""
    import os
    import subprocess
    import sys

    args = ["compress", str(tiny_llama_dir), "--method", "whiten", "--keep", "0.5", "--stream", "on",
            "--calib-samples", "16", "--calib-len", "32", "--batch-size", "4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                          "--nproc-per-node", "2", "-m", "edgesvd", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 only
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = read_weights(tmp_path / "one"), read_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    details = [json.loads((tmp_path / f / "config.json").read_text())["edgesvd"]["details"] for f in ("one", "two")]
    assert details[0]["ranks"] == 1 and details[1]["ranks"] == 2
    # Each rank factorized its share of every block's layers (and broadcast them): the checkpoints above agree.
    one_rank, two_ranks = details[0]["factorized_by_rank"], details[1]["factorized_by_rank"]
    assert len(two_ranks) == 2 and min(two_ranks) > 0 and sum(two_ranks) == sum(one_rank)


def test_a_launch_of_several_processes_without_streaming_is_refused(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        compress(tiny_llama_dir, Whiten(keep=0.5), calib=CALIB, stream="off")


def test_the_streamed_path_calibrates_on_text_and_refuses_self(tiny_llama_dir):
    """No whole model to sample from: the decoder default (`self`) becomes the built-in corpus, and an
    explicit `--calib self` is one ConfigError naming the way out."""
    src = resolve_model(tiny_llama_dir)
    with pytest.raises(ConfigError, match="--stream off"):
        compress_streamed(src, Whiten(keep=0.5), CalibrationConfig(source="self", num_sequences=8, seq_len=16))
    done = compress_streamed(src, Whiten(keep=0.5), CalibrationConfig(num_sequences=8, seq_len=16))
    assert done.record.calibration["source"] == "builtin"
