"""The environment that decides a job's floating-point results, recorded in every ``result.json``.

At 2 bits, last-bit differences between CPU kernels (ISA, BLAS / oneDNN build, thread count) or GPUs flip
roundings that cascade through the solvers' error feedback: the same config can give another perplexity on
another machine. The record says which machine a number belongs to; ``jitter_seed`` (:mod:`oac.numerics`)
measures how large that numeric band is on one machine.
"""

from __future__ import annotations

import os
import platform

import torch

# ISA flags that select different CPU kernels in torch / MKL / oneDNN
_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags":
                    have = set(value.split())
                    flags = [x for x in _ISA if x in have]
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def environment(device: str = "cpu") -> dict:
    """cpu (model), isa (kernel-relevant flags), cpu_capability (torch's dispatch level), threads, the BLAS /
    oneDNN build as torch reports it (``torch_config``), and CUDA / cuDNN / GPU name when ``device`` is CUDA."""
    model, flags = _cpuinfo()
    env = {
        "cpu": model,
        "isa": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "torch_config": torch.__config__.show(),
        "parallel_info": torch.__config__.parallel_info(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "platform": platform.platform(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env.update({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "gpu": torch.cuda.get_device_name(), "gpu_capability": list(torch.cuda.get_device_capability()),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    return env


def summary(env: dict | None) -> str | None:
    """One short label for tables: ``<cpu> <capability> t<threads>`` (+ GPU)."""
    if not env:
        return None
    s = f"{env.get('cpu')} {env.get('cpu_capability')} t{env.get('threads')}"
    return s + (f" {env['gpu']}" if env.get("gpu") else "")
