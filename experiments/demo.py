"""`make demo`: fp16 and RTN 4/3/2-bit on the embedded SmolLM2-135M (CPU, offline, small settings).

WikiText2 perplexity at seqlen 512 on the first 16 windows (8,192 tokens): a smoke-scale figure,
comparable only with other rows of this table.
"""

from __future__ import annotations

import argparse
import logging
import time

from oac.compose import run_overrides

log = logging.getLogger("demo")

ROWS = [("fp16", []), ("rtn", ["method.wbits=4"]), ("rtn", ["method.wbits=3"]), ("rtn", ["method.wbits=2"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="outputs/demo")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for method, extra in ROWS:
        t = time.perf_counter()
        tag = method + "".join("-" + e.split("=")[1] for e in extra)
        ov = [f"model={args.model}", f"method={method}", *extra, "eval.ppl.datasets=[wikitext2]",
              f"eval.ppl.seqlen={args.seqlen}", f"eval.ppl.max_windows={args.windows}"]
        r = run_overrides(ov, f"{args.out}/{tag}")
        rows.append((tag, r.get("bits_full", 16.0), r["ppl"]["wikitext2"], time.perf_counter() - t))
    lines = [f"SmolLM2-135M ({args.model}), WikiText2 ppl @ seqlen {args.seqlen}, first {args.windows} windows", "",
             "| method | avg bits (full) | wikitext2 ppl | time (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {b:.3f} | {p:.2f} | {t:.0f} |" for m, b, p, t in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
