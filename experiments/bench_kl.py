"""KL reference stores side by side: ``full`` (exact, fp32 log-probs streamed to disk) vs ``topk`` (k log-probs + rest).

For one model and W perplexity windows of one set, each store is built from the FP model and then read back by the
KL pass of a perturbed copy (every projection weight + 5 % noise, a stand-in for quantization):

* reference pass: seconds per window, of which the store's own work (log-softmax, top-k, writing) is the part
  beyond a plain forward (measured as a forward without a store);
* KL pass: seconds per window on top of the plain forward; disk bytes per window; the memory either holds at once
  (one batch of the reference: batch × (seqlen−1) × vocab × 4 bytes for ``full``);
* the KL each gives and the top-k error relative to the exact value.

Writes ``<out>/kl_reference.md`` and ``.csv``.

    python -m experiments.bench_kl                                   # SmolLM2-135M, wikitext2, 4 windows of 512
    python -m experiments.bench_kl --model stories260k --seqlen 256  # seconds
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import tempfile
import time
from pathlib import Path

import torch

from oac.compose import compose_config
from oac.data.tokens import eval_stream
from oac.eval.kl import KLAccumulator, ensure_reference
from oac.eval.perplexity import eval_windows, perplexity
from oac.models import load_model

log = logging.getLogger("bench_kl")


def perturbed(model, scale: float = 0.05):
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return q


def memory_probe(args) -> None:
    """Peak RSS of loading the model and one perplexity pass over the windows, with the KL store or without."""
    import resource

    torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}"])
    model, tok = load_model(cfg.model, cache_dir=cfg.paths.cache_dir, device="cpu", dtype="float32")
    ids = eval_stream(tok, args.dataset, args.seqlen, data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir)
    windows, _ = eval_windows(ids, args.seqlen, max_windows=args.windows)
    with tempfile.TemporaryDirectory() as tmp:
        acc = None
        if args.memory != "off":
            key = {"bench": args.model, "mode": args.memory, "topk": 64 if args.memory == "topk" else None, "v": 1}
            ref = ensure_reference(model, windows, cache_dir=tmp, key=key, batch_size=1, device="cpu")
            acc = KLAccumulator(ref, windows.shape[0], args.seqlen)
        perplexity(model, windows.reshape(1, -1), args.seqlen, on_logits=acc)
    print(f"PEAK_RSS_GB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.3f}")


def peak_rss(args, mode: str) -> float:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "experiments.bench_kl", "--model", args.model, "--dataset", args.dataset,
                          "--seqlen", str(args.seqlen), "--windows", str(args.windows), "--threads", str(args.threads),
                          "--memory", mode], capture_output=True, text=True, check=True)
    return float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_GB")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--topk", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--memory", choices=["off", "full", "topk"], help="internal: one peak-RSS measurement")
    args = ap.parse_args()
    if args.memory:
        return memory_probe(args)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}"])
    model, tok = load_model(cfg.model, cache_dir=cfg.paths.cache_dir, device="cpu", dtype="float32")
    ids = eval_stream(tok, args.dataset, args.seqlen, data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir)
    windows, _ = eval_windows(ids, args.seqlen, max_windows=args.windows)
    q = perturbed(model)
    n = windows.shape[0]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) / n

    _, fwd_fp = timed(lambda: perplexity(model, windows.reshape(1, -1), args.seqlen))
    _, fwd_q = timed(lambda: perplexity(q, windows.reshape(1, -1), args.seqlen))
    vocab = model.get_output_embeddings().weight.shape[0]
    rows, exact = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for mode, k in [("full", None), *[("topk", k) for k in args.topk]]:
            key = {"bench": args.model, "mode": mode, "topk": k, "v": 1}
            ref, t_ref = timed(lambda: ensure_reference(model, windows, cache_dir=tmp, key=key, batch_size=1,
                                                        device="cpu"))
            acc = KLAccumulator(ref, n, args.seqlen)
            _, t_kl = timed(lambda: perplexity(q, windows.reshape(1, -1), args.seqlen, on_logits=acc))
            r = acc.result()
            exact = r["kl"] if mode == "full" else exact
            rows.append({"store": mode if mode == "full" else f"topk k={k}", "ref_s_per_window": t_ref,
                         "ref_overhead_s": t_ref - fwd_fp, "kl_pass_s_per_window": t_kl,
                         "kl_overhead_s": t_kl - fwd_q, "disk_mb_per_window": ref["bytes"] / n / 1e6,
                         "batch_memory_mb": min(64, args.seqlen - 1) * vocab * 4 / 1e6,
                         "kl": r["kl"], "kl_rel_error": r["kl"] / exact - 1, "top1": r["top1_agreement"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kl_reference.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# KL reference stores: full vs top-k", "",
             f"`python -m experiments.bench_kl --model {args.model} --dataset {args.dataset} --seqlen {args.seqlen} "
             f"--windows {args.windows} --threads {args.threads}`: {n} windows of {args.seqlen}, vocab {vocab}, "
             f"{args.threads} thread(s); the quantized model is stood in for by +5% weight noise. Plain forward: "
             f"{fwd_fp:.2f} s per window (FP), {fwd_q:.2f} s (perturbed).", "",
             "| store | reference s/window (overhead) | KL pass s/window (overhead) | disk MB/window | fp32 temporaries per step MB "
             "| KL (nats/token) | vs exact | top-1 agreement |", "|---|---|---|---|---|---|---|---|"]
    rss = {mode: peak_rss(args, mode) for mode in ("off", "full", "topk")}
    for r in rows:
        lines.append(f"| {r['store']} | {r['ref_s_per_window']:.2f} ({r['ref_overhead_s']:+.2f}) | "
                     f"{r['kl_pass_s_per_window']:.2f} ({r['kl_overhead_s']:+.2f}) | {r['disk_mb_per_window']:.2f} | "
                     f"{r['batch_memory_mb']:.2f} | {r['kl']:.5f} | {100 * r['kl_rel_error']:+.2f}% | "
                     f"{100 * r['top1']:.2f}% |")
    lines += ["", f"Peak RSS of a process that loads the model and runs one perplexity pass over the windows "
              f"(`--memory`, one subprocess each): no KL {rss['off']:.2f} GB, full reference {rss['full']:.2f} GB "
              f"(+{rss['full'] - rss['off']:.2f}), top-k {rss['topk']:.2f} GB (+{rss['topk'] - rss['off']:.2f})."]
    (out / "kl_reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
