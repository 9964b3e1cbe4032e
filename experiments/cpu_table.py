"""CPU-scale comparison tables on SmolLM2: each row is one `python -m experiments.run` job.

    python -m experiments.cpu_table gptq        # fp16, RTN, GPTQ at 4/3/2 bits, per-channel and g128 (576 = 4·128 + a short group of 64)
    python -m experiments.cpu_table backbones   # SpQR (tau 1.0 / 0.2 / inf), GPTQ/RTN 2-bit g128, BiLLM, RTN 1-bit
    python -m experiments.cpu_table gptq --nsamples 128 --only gptq-w4-pc ...   # other calibration size:
        # jobs under <out>/n128/, tables results/cpu_gptq_n128.{md,csv}

Jobs run one after another as subprocesses (finished jobs are skipped), each with the exact command
stored next to its row; the table goes to results/<name>.md and .csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger("cpu_table")

COMMON = ["model=smollm2-135m", "calib.nsamples=32", "calib.seqlen=512", "calib.sampling=doc",
          "eval.ppl.datasets=[wikitext2,c4-new]", "eval.ppl.seqlen=512", "eval.ppl.max_windows=20", "threads=1"]

TABLES = {
    "gptq": [("fp16", ["method=fp16"])]
    + [(f"{m}-w{b}-{'g128' if g == 128 else 'pc'}", [f"method={m}", f"method.wbits={b}", f"method.groupsize={g}"])
       for b in (4, 3, 2) for g in (-1, 128) for m in ("rtn", "gptq")]
    # GPTQ with the paper's LLaMA settings (act-order + true-sequential; METHODS.md B2)
    + [(f"gptq-w{b}-{'g128' if g == 128 else 'pc'}-act-ts", ["method=gptq", f"method.wbits={b}",
                                                             f"method.groupsize={g}", "method.act_order=true",
                                                             "method.true_sequential=true"])
       for b in (4, 3, 2) for g in (-1, 128)],
    "backbones": [
        ("spqr-w2-t1.0", ["method=spqr", "method.outlier_threshold=1.0"]),
        ("spqr-w2-t0.2", ["method=spqr", "method.outlier_threshold=0.2"]),
        ("spqr-w2-tinf", ["method=spqr", "method.outlier_threshold=inf"]),
        ("gptq-w2-g128", ["method=gptq", "method.wbits=2", "method.groupsize=128"]),
        ("rtn-w2-g128", ["method=rtn", "method.wbits=2", "method.groupsize=128"]),
        ("billm", ["method=billm"]),
        ("rtn-w1-pc", ["method=rtn", "method.wbits=1", "method.groupsize=-1"]),
    ],
}


def command(overrides: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *overrides, f"hydra.run.dir={out}"]


def common(nsamples: int = 32) -> list[str]:
    return [f"calib.nsamples={nsamples}" if o.startswith("calib.nsamples=") else o for o in COMMON]


def run_table(name: str, out_root: Path, only: list[str] | None = None, nsamples: int = 32) -> pd.DataFrame:
    rows = []
    base = common(nsamples)
    for tag, extra in TABLES[name]:
        if only and tag not in only:
            continue
        out = out_root / tag
        cmd = command(base + extra, out)
        res_file = out / "result.json"
        done = res_file.exists() and json.loads(res_file.read_text()).get("status") == "complete"
        if not done:
            log.info("running %s", tag)
            subprocess.run(cmd, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        r = json.loads(res_file.read_text()) if res_file.exists() else {"status": "missing"}
        rows.append({"row": tag, "method": r.get("method"), "wbits": r.get("wbits"), "groupsize": r.get("groupsize"),
                     "bits_reported": r.get("bits_reported"), "bits_full": r.get("bits_full"),
                     "outlier_fraction": r.get("outlier_fraction"), "salient_fraction": r.get("salient_fraction"),
                     "wikitext2": r.get("ppl", {}).get("wikitext2"), "c4-new": r.get("ppl", {}).get("c4-new"),
                     "quantize_s": r.get("time_s", {}).get("quantize"), "status": r.get("status"),
                     "command": "python -m experiments.run " + " ".join(shlex.quote(a) for a in base + extra)})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=sorted(TABLES))
    ap.add_argument("--out", default="outputs/cpu_tables")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (512 tokens each)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    suffix = "" if args.nsamples == 32 else f"_n{args.nsamples}"
    out = Path(args.out) / suffix.lstrip("_") if suffix else Path(args.out)
    df = run_table(args.table, out, args.only, args.nsamples)  # one flat root: rows shared by tables reuse a job
    Path("results").mkdir(exist_ok=True)
    name = f"{args.table}{suffix}"
    df.to_csv(f"results/cpu_{name}.csv", index=False)
    cols = ["row", "bits_reported", "bits_full", "outlier_fraction", "salient_fraction", "wikitext2", "c4-new",
            "quantize_s", "status"]
    md = df[cols].to_markdown(index=False, floatfmt=".4g")
    Path(f"results/cpu_{name}.md").write_text(
        f"# CPU table `{name}` (SmolLM2-135M)\n\nCommon settings: `{' '.join(common(args.nsamples))}`\n\n{md}\n\n"
        "Commands:\n\n" + "\n".join(f"- `{c}`" for c in df["command"]) + "\n")
    print(md)


if __name__ == "__main__":
    main()
