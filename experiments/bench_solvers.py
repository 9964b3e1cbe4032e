"""Time the layer solvers at LLaMA-7B and SmolLM2-135M layer shapes.

Random W and a positive-definite-after-damping Hessian H = 2 XᵀX / T from T correlated tokens. Reports the
median wall time of ``solve(W, H, cfg)`` over a few repeats and the peak memory the solve adds on top of its
inputs (CPU: peak RSS via /proc/self/clear_refs + VmHWM; CUDA: torch.cuda.max_memory_allocated).

    python -m experiments.bench_solvers --quick        # SmolLM2-135M shapes only
    python -m experiments.bench_solvers                # + LLaMA-7B shapes (slow on a small CPU)

Writes results/bench/solvers.md and results/bench/solvers.csv. Solvers are looked up by name in
``SOLVERS``; a solver whose module is missing (e.g. not written yet) is skipped with a warning.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import logging
import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger("bench_solvers")

# name -> (solver registry name, config overrides). Add entries here; missing solvers are skipped.
# RTN is timed without H (it needs none; with H it would also compute the diagnostic objective).
NO_HESSIAN = {"rtn"}
SOLVERS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {"wbits": 4}),
    "gptq": ("gptq", {"wbits": 4}),
    # g = 64 divides every d_in below (SmolLM2's 576 is not a multiple of 128)
    "gptq_g64_act": ("gptq", {"wbits": 4, "groupsize": 64, "act_order": True}),
    "spqr": ("spqr", {}),
    "billm": ("billm", {}),
}

# model -> [(layer names, d_out, d_in)]
SHAPES = {
    "SmolLM2-135M": [("q,o", 576, 576), ("k,v", 192, 576), ("gate,up", 1536, 576), ("down", 576, 1536)],
    "LLaMA-7B": [("q,k,v,o", 4096, 4096), ("gate,up", 11008, 4096), ("down", 4096, 11008)],
}


def load_solvers(names: list[str]) -> dict:
    from oac.solvers import get_solver

    out = {}
    for name in names:
        solver, overrides = SOLVERS[name]
        try:
            fn, cfg_cls = get_solver(solver)
        except (ImportError, AttributeError) as exc:
            log.warning("solver %s skipped: %s", name, exc)
            continue
        out[name] = (fn, cfg_cls(**overrides))
    return out


def make_hessian(d_in: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """H = 2 XᵀX / T with correlated X (shared low-rank factors, varied feature scales)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d_in, generator=g)
    X += torch.randn(tokens, 16, generator=g) @ torch.randn(16, d_in, generator=g)
    X *= torch.exp(0.5 * torch.randn(d_in, generator=g))
    return 2 * X.T @ X / tokens


class PeakMemory:
    """Peak memory added during a region, in MiB."""

    def __init__(self, device: str):
        self.device = device
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:  # reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
            self.base = self._status_kib("VmRSS") * 1024
        except OSError:
            self.exact = False  # fall back to the process-wide peak (an upper bound for later cases)
            self.base = self._status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            peak = self._status_kib("VmHWM") * 1024 if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.mib = max(0, peak - self.base) / 2**20
        return False


def bench_case(fn, cfg, W, H, device: str, repeats: int, slow_after: float) -> dict:
    times, mems = [], []
    for r in range(repeats):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            res = fn(W, H, cfg)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        mems.append(mem.mib)
        rel_err = float((res.weight - W.float()).norm() / W.float().norm())
        del res
        if times[-1] > slow_after:
            break  # one more repeat would cost too much on a small machine
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "peak_extra_mib": max(mems),
        "rel_err": rel_err,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-after", type=float, default=30.0, help="stop repeating once one solve takes longer (s)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens used to build H")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu (+cuda if available)")
    ap.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma list from {list(SOLVERS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")
    if "cuda" in devices:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    names = [n.strip() for n in args.solvers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOLVERS]
    if unknown:
        ap.error(f"unknown solvers {unknown}; known: {list(SOLVERS)}")
    solvers = load_solvers(names)
    models = ["SmolLM2-135M"] if args.quick else list(SHAPES)

    rows, hessians, warmed = [], {}, set()
    for device in devices:
        for model in models:
            for layers, d_out, d_in in SHAPES[model]:
                if d_in not in hessians:
                    hessians[d_in] = make_hessian(d_in, args.tokens)
                H = hessians[d_in].to(device)
                W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(d_out * 7 + d_in)).to(device)
                for name, (fn, cfg) in solvers.items():
                    try:
                        if (device, name) not in warmed:  # lazy init (CUDA handles, kernels), once
                            warmed.add((device, name))
                            fn(W[:64, :128].contiguous(), None if name in NO_HESSIAN else H[:128, :128].contiguous(), cfg)
                        Hc = None if name in NO_HESSIAN else H
                        r = bench_case(fn, cfg, W, Hc, device, args.repeats, args.slow_after)
                    except Exception as exc:  # keep the other cases going; the error is logged and tabled
                        log.exception("%s on %s %s %dx%d failed", name, device, model, d_out, d_in)
                        r = {"error": f"{type(exc).__name__}: {exc}"}
                    row = {"device": device, "solver": name, "model": model, "layers": layers,
                           "d_out": d_out, "d_in": d_in, **r}
                    log.info("%s", row)
                    rows.append(row)
                del W, H
        if device == "cuda":
            torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["device", "solver", "model", "layers", "d_out", "d_in", "median_s", "min_s", "repeats",
              "peak_extra_mib", "rel_err", "error"]
    with open(args.out / "solvers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if "cuda" in devices else "-"
    lines = [
        "# Layer-solver timings",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}; CPU {cpu}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads; GPU {gpu}.",
        f"Random W, H = 2XᵀX/T from T={args.tokens} correlated tokens; median of up to {args.repeats} repeats "
        f"(fewer when one solve exceeds {args.slow_after:g} s). Peak memory = what the solve adds above its inputs "
        "(CPU: peak RSS; CUDA: max_memory_allocated). Configs: "
        + "; ".join(f"`{n}` = {cfg}" for n, (_, cfg) in solvers.items()),
        "",
        "| device | solver | model | layers | d_out×d_in | median s | min s | n | peak +MiB | ‖Ŵ−W‖/‖W‖ |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['solver']} | {r['model']} | {r['layers']} | {r['d_out']}×{r['d_in']} "
                         f"| error: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['device']} | {r['solver']} | {r['model']} | {r['layers']} | {r['d_out']}×{r['d_in']} "
            f"| {r['median_s']:.3f} | {r['min_s']:.3f} | {r['repeats']} | {r['peak_extra_mib']:.0f} | {r['rel_err']:.4f} |"
        )
    (args.out / "solvers.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s and %s", args.out / "solvers.md", args.out / "solvers.csv")


if __name__ == "__main__":
    main()
