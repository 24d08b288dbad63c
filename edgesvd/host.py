"""This machine as a device: cores and memory read, peak compute and memory bandwidth estimated or timed."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostDevice:
    """What the `host` and `host-gpu` profiles learn about this machine."""

    name: str
    cores: int
    memory_bytes: float
    peak_gflops: float
    bandwidth_gbs: float


def _cpu_flops_per_cycle() -> int:
    """fp32 FLOP per cycle per core from the CPU's vector ISA (FMA counts two)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return 16  # two 128-bit NEON FMA pipes (Cortex-A76 class)
    if " avx512f" in flags:
        return 64
    if " fma" in flags and " avx2" in flags:
        return 32
    return 8


def _cpu_ghz() -> float:
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.lower().startswith("cpu mhz")]
        if mhz:
            return max(mhz) / 1000
    except (OSError, ValueError):
        pass
    return 2.0


def _copy_bandwidth_gbs(nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Memory bandwidth from the best of a few large array copies (read + write counted)."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def this_cpu() -> HostDevice:
    """This machine's cores and memory (read), peak fp32 compute (cores × clock × ISA width) and
    memory bandwidth (timed array copy)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HostDevice(f"{platform.node()}, {platform.processor() or platform.machine()}", cores, float(memory),
                      round(cores * _cpu_ghz() * _cpu_flops_per_cycle(), 1), round(_copy_bandwidth_gbs(), 1))


def this_gpu() -> HostDevice | None:
    """This machine's first CUDA GPU: name, SMs and memory from torch, peak fp16 matrix throughput
    and bandwidth from a timed matmul and copy; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    buf = torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8)

    def best(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    peak = 2 * 4096 ** 3 / best(lambda: a @ a) / 1e9
    bandwidth = 2 * buf.numel() / best(lambda: buf.clone()) / 1e9
    return HostDevice(props.name, props.multi_processor_count, float(props.total_memory), round(peak, 1),
                      round(bandwidth, 1))
