"""`make demo`: what the repository is for, in minutes on a laptop CPU.

On the embedded SmolLM2-135M (offline): fp16, then RTN, GPTQ, SpQR and OAC-SpQR at 2 bits. SpQR and OAC-SpQR
run at the same outlier budget (1% of the weights per layer), so the only difference between them is the
Hessian fed to the same solver: the layer-wise 2XᵀX or OAC's output-adaptive Ĥ. Small settings (calibration
8 x 256 tokens from the local C4 sample, WikiText2 at seqlen 512, first 16 windows = 8,192 tokens): smoke-scale
figures, comparable only with the other rows of this table (the README has the seed-repeated comparison).

    python -m experiments.demo [--refresh per_block|every|once] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import time

from oac.compose import run_overrides

log = logging.getLogger("demo")

W2 = ["method.wbits=2"]
O1 = ["+method.target_outlier_fraction=0.01"]


def rows(refresh: str, every: int) -> list[tuple[str, list[str]]]:
    oac = [f"method.oac.refresh={refresh}"] + ([f"method.oac.refresh_every={every}"] if refresh == "every" else [])
    return [("fp16", ["method=fp16"]),
            ("RTN w2 g128", ["method=rtn", *W2, "method.groupsize=128"]),
            ("GPTQ w2 g128", ["method=gptq", *W2, "method.groupsize=128"]),
            ("SpQR w2, 1% outliers", ["method=spqr", *W2, *O1]),
            (f"OAC-SpQR w2, 1% outliers (refresh {refresh}{f' {every}' if refresh == 'every' else ''})",
             ["method=oac_spqr", *W2, *O1, *oac])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    # per_block (the paper's) costs ~N·K²/2 block passes, about half of the demo's time on 2 cores; on a slower
    # machine --refresh every --every 2 halves that (METHODS.md C7; the table says which was used)
    ap.add_argument("--refresh", default="per_block", choices=["per_block", "every", "once"])
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="outputs/demo")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common = [f"model={args.model}", f"calib.nsamples={args.nsamples}", f"calib.seqlen={args.calib_seqlen}",
              "eval.ppl.datasets=[wikitext2]", f"eval.ppl.seqlen={args.seqlen}", f"eval.ppl.max_windows={args.windows}",
              "device=cpu"] + ([f"threads={args.threads}"] if args.threads else [])
    t0 = time.perf_counter()
    table = []
    for label, extra in rows(args.refresh, args.every):
        t = time.perf_counter()
        tag = "-".join(o.split("=", 1)[1] for o in extra).replace("/", "_")
        r = run_overrides(common + extra, f"{args.out}/{tag}")
        dt = r["time_s"]["total"] if r.get("skipped") else time.perf_counter() - t
        table.append((label, r.get("bits_reported", 16.0), r.get("outlier_fraction"), r["ppl"]["wikitext2"], dt,
                      " (from an earlier run)" if r.get("skipped") else ""))
    lines = [f"{args.model}: WikiText2 ppl at seqlen {args.seqlen}, first {args.windows} windows; calibration "
             f"{args.nsamples} x {args.calib_seqlen} (local C4)", "",
             "| method | bits | outliers | wikitext2 ppl | time (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {b:.3f} | {'—' if o is None else f'{100 * o:.2f}%'} | {p:.2f} | {t:.0f}{s} |"
              for m, b, o, p, t, s in table]
    lines += ["", f"total {time.perf_counter() - t0:.0f} s. SpQR and OAC-SpQR: same solver, same windows, same "
              "outlier budget; only the Hessian differs."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
