"""The same jobs computed on two machines: how far apart are their numbers? (the cross-machine numeric band)

    python -m experiments.machines results/raw/main_cpu_amd outputs/main_cpu [--out results/main_cpu_machines.md]

Jobs are matched by ``config_hash`` (the same resolved configuration, seed and jitter included); each side's
floating-point environment (``environment`` in result.json: CPU, dispatch level, threads) is shown. Per job and
set: perplexity and KL on both machines and their log-ratio; then, per quality metric, the spread of the
cross-machine log-ratios (RMS) next to the std of ln(metric) over calibration seeds on the second machine, the
yardstick the paired verdicts use. A job is compared only when it is complete on both sides and the two sides'
environments differ (a job merged into both trees from one machine is not a cross-machine pair).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.report import find_results
from experiments.seeds import metric_name
from oac.rows import result_row

log = logging.getLogger("machines")


def _frame(root: str | Path) -> pd.DataFrame:
    rows = [result_row(r, d) for d, r in find_results(root)]
    df = pd.DataFrame(rows)
    return df[df["status"] == "complete"] if len(df) else df


def compare(a_root: str | Path, b_root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per job and metric: values on both machines and ln b/a; per metric: RMS cross-machine log-ratio vs the
    seed std of ln(metric) on machine b, per configuration averaged)."""
    a, b = _frame(a_root), _frame(b_root)
    if a.empty or b.empty:
        return pd.DataFrame(), pd.DataFrame()
    metrics = [c for c in a.columns if c.startswith(("ppl:", "kl:")) and c in b.columns]
    both = a.merge(b, on="config_hash", suffixes=("_a", "_b"))
    same = both["environment_a"] == both["environment_b"]  # the same job on the same machine on both sides (a copy)
    if same.any():
        log.info("%d job(s) come from the same environment on both sides: not a cross-machine pair, left out",
                 int(same.sum()))
    both = both[~same]
    rows = []
    for _, r in both.iterrows():
        for m in metrics:
            va, vb = r.get(f"{m}_a"), r.get(f"{m}_b")
            if va is None or vb is None or not (np.isfinite(va) and np.isfinite(vb)):
                continue
            rows.append({"config_hash": r["config_hash"], "group": r["group_a"], "label": r.get("overrides_a"),
                         "replicate": r["replicate_a"], "method": r["method_a"], "metric": m,
                         "env_a": r["environment_a"], "env_b": r["environment_b"], "a": va, "b": vb,
                         "log_ratio": math.log(vb / va), "identical": va == vb})
    per_job = pd.DataFrame(rows)
    if per_job.empty:
        return per_job, pd.DataFrame()
    # seed spread on machine b: std over calibration seeds (unjittered) of ln(metric), per configuration
    seeds = b[b["jitter_seed"].isna()] if "jitter_seed" in b else b
    spread = []
    for m in metrics:
        sd = [np.log(pd.to_numeric(g[m], errors="coerce").dropna()).std(ddof=1)
              for _, g in seeds.groupby("group") if g[m].notna().sum() > 1 and g["group"].iloc[0] in set(per_job["group"])]
        lr = per_job[per_job["metric"] == m]["log_ratio"]
        spread.append({"metric": m, "n_jobs": len(lr), "n_identical": int(per_job[per_job["metric"] == m]["identical"].sum()),
                       "rms_log_ratio": float(np.sqrt((lr ** 2).mean())), "max_abs_log_ratio": float(lr.abs().max()),
                       "seed_sd_log": float(np.mean(sd)) if sd else float("nan"), "n_configs_seed_sd": len(sd)})
    return per_job, pd.DataFrame(spread)


def _pct(sd_log: float) -> str:
    return "—" if not math.isfinite(sd_log) else f"{100 * sd_log:.1f}%"


def markdown(per_job: pd.DataFrame, spread: pd.DataFrame, a_root, b_root) -> str:
    if per_job.empty:
        return "# Cross-machine comparison\n\nNo job is complete on both sides.\n"
    env_a, env_b = per_job["env_a"].iloc[0], per_job["env_b"].iloc[0]
    lines = ["# The same jobs on two machines", "",
             f"Produced by `python -m experiments.machines {a_root} {b_root}`. Jobs matched by `config_hash` (same "
             "configuration, calibration seed and jitter); A: " + f"`{env_a}`, B: `{env_b}`" + ". Δ = B/A − 1.", "",
             "## Spread of the cross-machine differences vs the calibration-seed spread", "",
             "RMS of ln(B/A) over the matched jobs, against the std of ln(metric) over calibration seeds on B (mean "
             "over the configurations with ≥ 2 seeds): a ratio near 1 means another machine moves a number as much "
             "as another calibration seed does.", "",
             "| metric | jobs | bit-identical | RMS Δ | max abs Δ | seed std (B) | RMS / seed std |", "|---|---|---|---|---|---|---|"]
    for _, r in spread.iterrows():
        ratio = r["rms_log_ratio"] / r["seed_sd_log"] if r["seed_sd_log"] and math.isfinite(r["seed_sd_log"]) else float("nan")
        lines.append(f"| {metric_name(r['metric'])} | {r['n_jobs']} | {r['n_identical']} | "
                     f"{100 * (math.exp(r['rms_log_ratio']) - 1):.1f}% | {100 * (math.exp(r['max_abs_log_ratio']) - 1):.1f}% | "
                     f"{_pct(r['seed_sd_log'])} | {'—' if not math.isfinite(ratio) else f'{ratio:.2f}'} |")
    lines += ["", "## Per job", "", "| job | metric | A | B | Δ |", "|---|---|---|---|---|"]
    for _, r in per_job.sort_values(["method", "replicate", "metric"]).iterrows():
        lines.append(f"| {r['method']} {r['replicate']} | {metric_name(r['metric'])} | {r['a']:.4g} | {r['b']:.4g} | "
                     f"{100 * (math.exp(r['log_ratio']) - 1):+.1f}% |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="root of the first machine's result.json files")
    ap.add_argument("b", help="root of the second machine's result.json files")
    ap.add_argument("--out", default=None, help="Markdown file (default: print)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    per_job, spread = compare(args.a, args.b)
    text = markdown(per_job, spread, args.a, args.b)
    if args.out:
        Path(args.out).write_text(text)
        per_job.to_csv(Path(args.out).with_suffix(".csv"), index=False)
        log.info("%d matched job-metrics -> %s", len(per_job), args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
