"""onnxruntime execution providers: which ones really work here, and session options."""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from edgesvd.errors import ConfigError, DeviceError, ExportError, first_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
EP_NAMES = {"cpu": CPU, "cuda": CUDA}


@dataclass(frozen=True)
class SessionConfig:
    """Session options that change latency; recorded in reports and bundle manifests."""

    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("thread counts must be >= 0 (0 lets onnxruntime choose)")
        if self.graph_optimization not in ("disable", "basic", "extended", "all"):
            raise ConfigError(f"unknown graph optimization level '{self.graph_optimization}'")

    def to_json(self) -> dict:
        return asdict(self)


def session_options(cfg: SessionConfig = SessionConfig(), profile_prefix: str | None = None):
    """onnxruntime.SessionOptions for `cfg`; profiling only when a prefix is given (never while timing)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.intra_op_threads
    so.inter_op_num_threads = cfg.inter_op_threads
    so.graph_optimization_level = levels[cfg.graph_optimization]
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


@lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): onnxruntime lists the CUDA EP *and* a session really runs on a GPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA execution provider"
    if not any(Path("/dev").glob("nvidia[0-9]*")):  # cheap and silent, before onnxruntime logs errors
        return False, "no NVIDIA GPU is present"
    if hasattr(ort, "preload_dlls"):  # finds CUDA/cuDNN installed from pip wheels, when present
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ort.preload_dlls(directory="")
            except Exception:
                pass
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=[CUDA, CPU])
    except Exception as exc:
        return False, f"the CUDA execution provider failed to start ({first_line(exc, 120)})"
    if sess.get_providers()[0] != CUDA:
        return False, "onnxruntime lists the CUDA execution provider but no usable GPU is present"
    return True, "GPU present"


def resolve_eps(requested: tuple[str, ...], allow_cpu_fallback: bool = False) -> list[str]:
    """Provider names for the user's --ep choices ('cpu', 'cuda', 'auto').

    'auto' means CPU plus CUDA when a GPU works. Asking for 'cuda' without a GPU is a DeviceError,
    unless `allow_cpu_fallback`, in which case CPU is used instead.
    """
    eps: list[str] = []
    for name in requested:
        if name == "auto":
            eps.append(CPU)
            if cuda_status()[0]:
                eps.append(CUDA)
            continue
        if name not in EP_NAMES:
            raise ConfigError(f"unknown execution provider '{name}' (choose from cpu, cuda, auto)")
        if name == "cuda":
            usable, reason = cuda_status()
            if not usable:
                if not allow_cpu_fallback:
                    raise DeviceError(f"the CUDA execution provider was asked for but {reason} "
                                      "(use --ep cpu, or --allow-cpu-fallback)")
                eps.append(CPU)
                continue
        eps.append(EP_NAMES[name])
    return list(dict.fromkeys(eps))


def create_session(path, cfg: SessionConfig, provider: str, profile_prefix: str | None = None):
    """An InferenceSession on one provider; an unloadable model is an ExportError, not a traceback."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(cfg, profile_prefix), providers=[provider])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {path} on {provider}: {first_line(exc)}") from exc


def load_causal_lm(path, provider: str = CPU, cfg: SessionConfig = SessionConfig()):
    """optimum's ORTModelForCausalLM over the decoder export `path` (its model.onnx), with the KV-cache
    shape read from the graph; an unloadable model is an ExportError, as in create_session.

    optimum-onnx 0.1.0 takes the cache's head count and head size from a list of model types and falls
    back to num_attention_heads and hidden ÷ heads: Gemma 2 and Phi-3 with grouped-query attention
    then feed a cache with too many heads, and Qwen3 and Gemma 2 one of the wrong width where head_dim
    is not hidden ÷ heads (Qwen3-0.6B: 128 against 64). The graph's past_key_values inputs fix both,
    as (batch, heads, past, head_dim)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    path = Path(path)
    try:
        ort_model = ORTModelForCausalLM.from_pretrained(path.parent, file_name=path.name, provider=provider,
                                                        session_options=session_options(cfg),
                                                        use_io_binding=provider == CUDA)
    except Exception as exc:  # onnxruntime's InvalidProtobuf/Fail, optimum's ValueError
        raise ExportError(f"onnxruntime cannot load {path} on {provider}: {first_line(exc)}") from exc
    past = [i.shape for i in ort_model.session.get_inputs() if i.name.startswith("past_key_values")]
    if past and len(past[0]) == 4 and all(isinstance(d, int) for d in (past[0][1], past[0][3])):
        ort_model.num_key_value_heads, ort_model.embed_size_per_head = past[0][1], past[0][3]
    return ort_model
