"""Time the layer solvers at LLaMA-7B and SmolLM2-135M layer shapes, with and without diagnostics.

Random W and a positive-definite-after-damping Hessian H = 2 XᵀX / T from T correlated tokens, the same
(W, H) for every run of a shape (seeded by the shape). Each solver runs with ``diagnostics`` off and on (RTN:
without and with H, its opt-in for the objective), at one torch thread and at all threads. Reports the
median wall time of ``solve(W, H, cfg)`` over a few repeats, the peak memory the solve adds on top of its
inputs (CPU: peak RSS via /proc/self/clear_refs + VmHWM; CUDA: torch.cuda.max_memory_allocated), and
whether Ŵ is bit-identical to the one-thread run without diagnostics.

    python -m experiments.bench_solvers --quick        # SmolLM2-135M shapes only
    python -m experiments.bench_solvers                # + LLaMA-7B 4096x4096 and 4096x11008 (slow on a small CPU)

Writes results/bench/solvers.md and results/bench/solvers.csv (the md file records the exact command).
Solvers are looked up by name in ``SOLVERS``; a solver whose module is missing is skipped with a warning.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import gc
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger("bench_solvers")

# name -> (solver registry name, config overrides). Add entries here; missing solvers are skipped.
# RTN has no diagnostics switch: "diagnostics on" passes H (its objective), "off" passes None.
NO_DIAG_FIELD = {"rtn"}
SOLVERS: dict[str, tuple[str, dict]] = {
    "rtn_w3_g128": ("rtn", {"wbits": 3, "groupsize": 128}),
    "gptq_w3_g128_act": ("gptq", {"wbits": 3, "groupsize": 128, "act_order": True}),
    "spqr_w2": ("spqr", {}),  # project defaults = the OAC comparison's: w2, β1 = β2 = 16, 3-bit stats, τ = 1
    "billm": ("billm", {}),
}

# model -> [(layer names, d_out, d_in)]; g128 now runs on SmolLM2's d_in = 576 (short last group)
SHAPES = {
    "SmolLM2-135M": [("q,o", 576, 576), ("k,v", 192, 576), ("gate,up", 1536, 576), ("down", 576, 1536)],
    "LLaMA-7B": [("q,k,v,o", 4096, 4096), ("down", 4096, 11008)],
}
GATE_UP_7B = ("gate,up", 11008, 4096)  # --gate-up: as costly as down, not timed by default

# one-thread times of the official implementations on this kind of machine (s), for comparison
OFFICIAL_1T = {
    ("gptq_w3_g128_act", 4096, 4096): "9.1", ("gptq_w3_g128_act", 4096, 11008): "52.7",
    ("spqr_w2", 4096, 4096): "14–18", ("spqr_w2", 4096, 11008): "61",
    ("billm", 4096, 4096): "84", ("billm", 4096, 11008): "191",
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


def with_diagnostics(name: str, cfg, on: bool):
    if name in NO_DIAG_FIELD or not hasattr(cfg, "diagnostics"):
        return cfg
    return dataclasses.replace(cfg, diagnostics=on)


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


def bench_case(fn, cfg, W, H, device: str, repeats: int, slow_after: float) -> tuple[dict, "torch.Tensor"]:
    times, mems = [], []
    for r in range(repeats):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            res = fn(W, H, cfg)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        mems.append(mem.mib)
        weight = res.weight
        rel_err = float((weight - W.float()).norm() / W.float().norm())
        diag_s = res.stats.get("diagnostics_s")
        del res
        if times[-1] > slow_after:
            break  # one more repeat would cost too much on a small machine
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "peak_extra_mib": max(mems),
        "rel_err": rel_err,
        "diag_share": "" if diag_s is None else diag_s / times[-1],  # of the last repeat, as timed by the solver
    }, weight


def _fmt_s(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _fmt_share(x) -> str:
    return "" if x in (None, "") else f"{100 * x:.1f} %"


def summary_table(rows: list[dict], thread_counts: list[int]) -> list[str]:
    """One line per (device, solver, shape): times at each thread count without / with diagnostics, and the
    share of each solve spent on its diagnostics (timed inside the solver)."""
    keyed: dict[tuple, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        k = (r["device"], r["solver"], r["model"], r["layers"], r["d_out"], r["d_in"])
        keyed.setdefault(k, {})[(r["threads"], r["diagnostics"])] = r
    head = "| device | solver | model | layers | d_out×d_in |"
    sep = "|---|---|---|---|---|"
    for t in thread_counts:
        head += f" {t} thr: s | its diag share | {t} thr, diag: s | its diag share |"
        sep += "---:|---:|---:|---:|"
    head += " official, 1 thr: s |"
    sep += "---:|"
    out = [head, sep]
    for k, v in keyed.items():
        dev, solver, model, layers, d_out, d_in = k
        line = f"| {dev} | {solver} | {model} | {layers} | {d_out}×{d_in} |"
        for t in thread_counts:
            for diag in (False, True):
                r = v.get((t, diag), {})
                line += f" {_fmt_s(r.get('median_s'))} | {_fmt_share(r.get('diag_share'))} |"
        line += f" {OFFICIAL_1T.get((solver, d_out, d_in), '')} |"
        out.append(line)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only")
    ap.add_argument("--gate-up", action="store_true", help="also LLaMA-7B gate/up (11008x4096)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-after", type=float, default=5.0, help="stop repeating once one solve takes longer (s)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens used to build H")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu (+cuda if available)")
    ap.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma list from {list(SOLVERS)}")
    ap.add_argument("--threads", default="1,all",
                    help="comma list of torch CPU thread counts; 'all' = os.cpu_count() (default: 1,all)")
    ap.add_argument("--diagnostics", default="off,on", help="comma list of off,on (default: both)")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--note", default="", help="a paragraph added to the md report (e.g. machine conditions)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    thread_counts = list(dict.fromkeys(os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")))
    diag_modes = [{"off": False, "on": True}[d] for d in args.diagnostics.split(",")]

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
    shapes = [(m, *s) for m in models for s in SHAPES[m]]
    if args.gate_up and not args.quick:
        shapes.append(("LLaMA-7B", *GATE_UP_7B))

    rows, warmed = [], set()
    t_bench = time.perf_counter()
    for device in devices:
        hessians = {}
        for model, layers, d_out, d_in in shapes:
            if d_in not in hessians:
                torch.set_num_threads(max(thread_counts))
                hessians[d_in] = make_hessian(d_in, args.tokens).to(device)
            H = hessians[d_in]
            W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(d_out * 7 + d_in)).to(device)
            for name, (fn, base_cfg) in solvers.items():
                first = None  # Ŵ of the first run (lowest thread count, diagnostics off): the others must equal it
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for diag in diag_modes:
                        cfg = with_diagnostics(name, base_cfg, diag)
                        Hc = H if (diag or name not in NO_DIAG_FIELD) else None
                        try:
                            if (device, name, threads) not in warmed:  # lazy init (CUDA handles, thread pools), once
                                warmed.add((device, name, threads))
                                fn(W[:64, :128].contiguous(), None if Hc is None else H[:128, :128].contiguous(), cfg)
                            r, weight = bench_case(fn, cfg, W, Hc, device, args.repeats, args.slow_after)
                            if first is None:
                                first = weight
                            r["same_w"] = bool(torch.equal(weight, first))
                            del weight
                        except Exception as exc:  # keep the other cases going; the error is logged and tabled
                            log.exception("%s on %s %s %dx%d failed", name, device, model, d_out, d_in)
                            r = {"error": f"{type(exc).__name__}: {exc}"}
                        row = {"device": device, "solver": name, "model": model, "layers": layers, "d_out": d_out,
                               "d_in": d_in, "threads": threads, "diagnostics": diag, **r}
                        log.info("%s", row)
                        rows.append(row)
                del first
            del W
        del hessians
        if device == "cuda":
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t_bench

    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["device", "solver", "model", "layers", "d_out", "d_in", "threads", "diagnostics", "median_s", "min_s",
              "repeats", "peak_extra_mib", "rel_err", "diag_share", "same_w", "official_1t_s", "error"]
    with open(args.out / "solvers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            row = {**row, "official_1t_s": OFFICIAL_1T.get((row["solver"], row["d_out"], row["d_in"]), "")}
            w.writerow({k: row.get(k, "") for k in fields})

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if "cuda" in devices else "-"
    command = shlex.join(["python", "-m", "experiments.bench_solvers", *argv])
    lines = [
        "# Layer-solver timings",
        "",
        f"Command: `{command}` (wall time of the whole run: {wall / 60:.1f} min).",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}; CPU {cpu}, "
        f"{os.cpu_count()} cores (shared with other jobs: times are upper bounds); thread counts {thread_counts}; "
        f"GPU {gpu}.",
        f"Random W, H = 2XᵀX/T from T={args.tokens} correlated tokens, the same (W, H) for every run of a shape; "
        f"median of up to {args.repeats} repeats (fewer when one solve exceeds {args.slow_after:g} s). "
        "diag = `diagnostics=True` (the exact tr(ΔW H ΔWᵀ) by the plain d_out·d_in² product; RTN: H passed); "
        "without it GPTQ/SpQR still report `loss` and `objective` from the sweep's OBS errors, BiLLM no objective. "
        "'diag share' = the solver's own `stats['diagnostics_s']` (wall time of its loss/objective code) over the "
        "solve time. "
        "'official' = one-thread times of the reference implementations on this kind of machine. Configs: "
        + "; ".join(f"`{n}` = {cfg}" for n, (_, cfg) in solvers.items()),
        "",
        *([args.note, ""] if args.note else []),
        *summary_table(rows, thread_counts),
        "",
        "All runs (same Ŵ = bit-identical to the first run of that solver and shape, "
        f"{thread_counts[0]} thread(s) without diagnostics):",
        "",
        "| device | solver | model | layers | d_out×d_in | threads | diag | median s | min s | n | peak +MiB "
        "| ‖Ŵ−W‖/‖W‖ | diag share | same Ŵ |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pre = (f"| {r['device']} | {r['solver']} | {r['model']} | {r['layers']} | {r['d_out']}×{r['d_in']} "
               f"| {r['threads']} | {'on' if r['diagnostics'] else 'off'} ")
        if "error" in r:
            lines.append(pre + f"| error: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(pre + f"| {r['median_s']:.3f} | {r['min_s']:.3f} | {r['repeats']} | {r['peak_extra_mib']:.0f} "
                     f"| {r['rel_err']:.4f} | {_fmt_share(r['diag_share'])} | {'yes' if r['same_w'] else 'NO'} |")
    (args.out / "solvers.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s and %s", args.out / "solvers.md", args.out / "solvers.csv")


if __name__ == "__main__":
    main()
