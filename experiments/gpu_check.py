"""`make gpu-check`: the CUDA path end to end, in a few minutes, whenever a CUDA machine is available.

1. Every method on SmolLM2-135M in fp16 on the GPU with the settings of a committed CPU table row (same
   calibration windows: same data, sizes and seed), perplexity side by side with the committed fp32 CPU number.
   fp16 vs fp32 and GPU vs CPU kernels differ in the last bits, which 2-bit error feedback amplifies: the check
   is "same ballpark and finite", the ratio is printed, not asserted.
2. Every solver timed at LLaMA-7B layer shapes on the GPU (experiments/bench_solvers.py's cases), with the peak
   GPU memory of each.

    python -m experiments.gpu_check                  # on a CUDA machine -> results/gpu_check.{md,csv}
    python -m experiments.gpu_check --dry-run        # CPU, stories260K, tiny shapes: what `make test` runs

Each job's peak GPU memory comes from its result.json (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from oac.compose import run_overrides

log = logging.getLogger("gpu_check")
ROOT = Path(__file__).resolve().parents[1]

# (row label, committed CSV, row in it, overrides): the committed rows' own settings (experiments/cpu_table.py,
# configs/experiment/table1_cpu.yaml, table2_cpu.yaml)
CPU_TABLE = ["calib.nsamples=32", "calib.seqlen=512", "calib.sampling=doc", "eval.ppl.datasets=[wikitext2,c4-new]",
             "eval.ppl.seqlen=512", "eval.ppl.max_windows=20"]
SEED_TABLE = ["calib.nsamples=16", "calib.seqlen=512", "calib.seed=0", "eval.ppl.datasets=[wikitext2,c4-new]",
              "eval.ppl.seqlen=512", "eval.ppl.max_windows=20"]
JOBS = [
    ("fp16", "cpu_gptq.csv", "fp16", CPU_TABLE + ["method=fp16"]),
    ("rtn w4 g128", "cpu_gptq.csv", "rtn-w4-g128", CPU_TABLE + ["method=rtn", "method.wbits=4", "method.groupsize=128"]),
    ("gptq w4 g128", "cpu_gptq.csv", "gptq-w4-g128",
     CPU_TABLE + ["method=gptq", "method.wbits=4", "method.groupsize=128"]),
    ("gptq w3 g128 act+ts", "cpu_gptq.csv", "gptq-w3-g128-act-ts",
     CPU_TABLE + ["method=gptq", "method.wbits=3", "method.groupsize=128", "method.act_order=true",
                  "method.true_sequential=true"]),
    ("spqr w2 τ=1", "cpu_backbones.csv", "spqr-w2-t1.0", CPU_TABLE + ["method=spqr", "method.outlier_threshold=1.0"]),
    ("billm", "cpu_backbones.csv", "billm", CPU_TABLE + ["method=billm"]),
    ("oac_spqr w2 1%", "table1_cpu_runs.csv", "oac_spqr",
     SEED_TABLE + ["setting=oac_spqr_w2_o1"]),
    ("oac_billm", "table2_cpu_runs.csv", "oac_billm", SEED_TABLE + ["setting=oac_billm"]),
]
DRY = ["model=stories260k", "device=cpu", "dtype=float32", "calib.nsamples=4", "calib.seqlen=32",
       "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "threads=1"]
DRY_JOBS = [("fp16", ["method=fp16"]), ("rtn", ["method=rtn"]), ("gptq g32", ["method=gptq", "method.groupsize=32"]),
            ("spqr g4", ["method=spqr", "method.groupsize=4", "method.qq_groupsize=4"]), ("billm", ["method=billm"]),
            ("oac_gptq", ["method=oac_gptq"])]


def committed(csv_name: str, row: str, dataset: str) -> float | None:
    """The committed CPU number of a row (cpu_table CSVs: column ``row``; table runs: ``method``)."""
    path = ROOT / "results" / csv_name
    if not path.exists():
        return None
    with open(path) as f:
        for r in csv.DictReader(f):
            if r.get("row", r.get("method")) == row:
                v = r.get(dataset) or r.get(f"ppl:{dataset}")
                return float(v) if v not in (None, "") else None
    return None


def run_jobs(dry: bool, out: Path) -> list[dict]:
    rows = []
    jobs = [(lab, None, None, DRY + ov) for lab, ov in DRY_JOBS] if dry else \
        [(lab, c, r, ["model=smollm2-135m", "device=cuda", "dtype=float16", *ov]) for lab, c, r, ov in JOBS]
    for label, csv_name, row, ov in jobs:
        t = time.perf_counter()
        try:
            res = run_overrides(ov, out / "jobs" / label.replace(" ", "_"))
            err = None
        except Exception as e:  # noqa: BLE001 - the check reports every failure and goes on
            res, err = {}, f"{type(e).__name__}: {e}".splitlines()[0]
        rec = {"job": label, "status": res.get("status", "failed"), "error": err, "wall_s": time.perf_counter() - t,
               "bits": res.get("bits_reported"), "gpu_peak_gb": (res.get("peak_mem_gb") or {}).get("cuda_gb"),
               "command": "python -m experiments.run " + " ".join(shlex.quote(o) for o in ov)}
        for d, v in (res.get("ppl") or {}).items():
            ref = committed(csv_name, row, d) if csv_name else None
            rec[f"ppl:{d}"] = v
            rec[f"cpu:{d}"] = ref
            rec[f"ratio:{d}"] = v / ref if ref and v and math.isfinite(v) else None
        rows.append(rec)
        log.info("%s: %s %s", label, rec["status"], {k: v for k, v in rec.items() if k.startswith("ppl:")})
    return rows


def time_solvers(dry: bool) -> list[dict]:
    from experiments.bench_solvers import SOLVERS, bench_case, load_solvers, make_hessian

    device = "cpu" if dry else "cuda"
    shapes = [(64, 128)] if dry else [(4096, 4096), (4096, 11008)]
    out = []
    for name, (fn, cfg) in load_solvers(list(SOLVERS)).items():
        for d_out, d_in in shapes:
            g = torch.Generator().manual_seed(d_out * 100003 + d_in)
            W = torch.randn(d_out, d_in, generator=g).to(device)
            H = make_hessian(d_in, 2 * d_in).to(device)
            stats, _ = bench_case(fn, cfg, W, H, device, repeats=1, slow_after=float("inf"))
            out.append({"solver": name, "d_out": d_out, "d_in": d_in, "device": device, **stats})
            log.info("%s %dx%d: %s", name, d_out, d_in, stats)
            del W, H
    return out


def markdown(jobs: list[dict], solvers: list[dict], device: str, cmd: str) -> str:
    lines = [f"# GPU check ({device})", "", f"Produced by `{cmd}`.", "",
             "## SmolLM2-135M, fp16 on the GPU vs the committed fp32 CPU numbers (same windows)", "",
             "| job | status | bits | wikitext2 (GPU) | CPU | ratio | c4-new (GPU) | CPU | ratio | peak GPU GB | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, p=2):
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{p}f}"

    for r in jobs:
        cells = []
        for d in ("wikitext2", "c4-new"):
            cells += [f(r.get(f"ppl:{d}")), f(r.get(f"cpu:{d}")), f(r.get(f"ratio:{d}"), 3)]
        lines.append(f"| {r['job']} | {r['status']}{' — ' + r['error'] if r['error'] else ''} | {f(r['bits'], 3)} | "
                     + " | ".join(cells) + f" | {f(r['gpu_peak_gb'])} | {r['wall_s']:.0f} |")
    lines += ["", "## Solvers at LLaMA-7B shapes (one call each)", "",
              "| solver | d_out×d_in | time s | peak memory added (MiB) |", "|---|---|---:|---:|"]
    for r in solvers:
        lines.append(f"| {r['solver']} | {r['d_out']}×{r['d_in']} | {f(r.get('median_s'), 2)} | "
                     f"{f(r.get('peak_extra_mib'), 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, stories260K, tiny shapes (the test of this script)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--work", default=str(ROOT / "outputs" / "gpu_check"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        log.error("no CUDA device: run this on a GPU machine, or --dry-run")
        return 2
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    jobs = run_jobs(args.dry_run, Path(args.work))
    solvers = time_solvers(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dry" if args.dry_run else "gpu_check"
    cmd = "python -m experiments.gpu_check" + (" --dry-run" if args.dry_run else "")
    (out / f"{name}.md").write_text(markdown(jobs, solvers, device, cmd))
    with open(out / f"{name}.csv", "w", newline="") as fh:
        keys = sorted({k for r in jobs for k in r})
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(jobs)
    print((out / f"{name}.md").read_text())
    return 0 if all(r["status"] == "complete" for r in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
