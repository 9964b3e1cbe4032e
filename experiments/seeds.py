"""Calibration-seed repeats: per-configuration statistics and paired OAC-vs-backbone verdicts.

Both work on the per-job frame of the report (``oac.rows.result_row``: one row per ``result.json``).

* A *configuration* (``group``) is a job config up to ``calib.seed``. :func:`seed_summary` gives, for every
  metric (perplexity per dataset, zero-shot accuracy, bits, outlier/salient fraction, times), the mean,
  standard deviation, min, max and n over its complete seeds, and lists the seeds that are missing.
* A *pair* joins an OAC configuration with its backbone: the same config once the Hessian-source keys are
  removed (``oac.rows.pair_key``). The same seed draws the same calibration windows, so per seed
  d_s = f(OAC_s) − f(backbone_s) is a paired difference. Over the n seeds complete on both sides:
  mean d, sd(d) and se = sd/√n; the verdict is "OAC better" / "OAC worse" when |mean d| > 2·se, else "tie";
  with n = 1 there is no sd and no verdict. Perplexity is compared on the log scale (d = ln ppl_OAC − ln
  ppl_backbone, shown as the % change exp(mean d) − 1) because its seed-to-seed spread grows with its level
  (binary perplexities are in the thousands); accuracies in points (higher is better).
* Missing jobs are reported, never dropped: the seeds expected of a calibrated configuration are all seeds
  seen in its table; a seed whose job is absent or not complete is listed with the configuration (and the
  pair), and the statistics use the complete seeds only. Configurations without calibration (fp16, RTN)
  do not depend on the seed and expect none.

With n = 3 the 2·se rule is lenient (a t-test would need ≈4.3·se at 95% with 2 degrees of freedom): a
"tie" is meaningful, an isolated "better" at n = 3 is a hint, not proof.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from oac.rows import BITS

TIMES = ["time_quantize_s", "time_hessian_s", "time_total_s"]
# the Hessian phase's work and memory; hessian_cost_*: with the recorded cost of Ĥ reloaded from the cache
COSTS = ["hessian_block_passes", "hessian_cost_s", "hessian_cost_passes", "hessian_pass_gb", "peak_rss_gb",
         "peak_cuda_gb"]
QUALITY = ("ppl:", "kl:", "top1:", "zs:")
HIGHER_IS_BETTER = ("zs:", "top1:")
LOG_SCALE = ("ppl:", "kl:")  # paired as log-ratios: their spread grows with their level


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Metrics of a per-job frame: perplexity, KL, top-1 agreement and accuracies first, then bits and times."""
    quality = [c for p in QUALITY for c in runs.columns if c.startswith(p)]
    return quality + [c for c in BITS + TIMES + COSTS if c in runs.columns]


def _seed_int(s) -> int | None:
    return None if s is None or (isinstance(s, float) and math.isnan(s)) else int(s)


def _jittered(df: pd.DataFrame) -> pd.Series:
    if "jitter_seed" not in df:
        return pd.Series(False, index=df.index)
    return df["jitter_seed"].map(lambda v: _seed_int(v) is not None).astype(bool)


def _reps(df: pd.DataFrame) -> pd.Series:
    if "replicate" in df:
        return df["replicate"]
    return df["calib_seed"].map(lambda s: None if _seed_int(s) is None else str(_seed_int(s)))


def _rep_key(r: str):
    seed, _, jit = str(r).partition("/j")
    return (int(seed) if seed.lstrip("-").isdigit() else 0, -1 if not jit else int(jit))


def _expected_seeds(runs: pd.DataFrame) -> dict[str, set[str]]:
    """Per table: every calibration-seed replicate (``<seed>``, unjittered) seen in a calibrated job of the table.
    Jitter replicates are extras: expected only of the configurations that have them."""
    calibrated = runs[runs["calibrated"].astype(bool)] if "calibrated" in runs else runs
    calibrated = calibrated[~_jittered(calibrated)]
    return {t: {r for r in _reps(sub) if isinstance(r, str)} for t, sub in calibrated.groupby("table")}


def _missing(sub: pd.DataFrame, expected: set[str]) -> list[str]:
    if "calibrated" in sub and not sub["calibrated"].astype(bool).any():
        return []
    done = set(_reps(sub[sub["status"] == "complete"]))
    tried = set(_reps(sub[_jittered(sub)]))  # a jitter replicate that exists but is not complete
    return sorted((expected | tried) - done, key=_rep_key)


def seed_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, metric): mean, std (n > 1), min, max, n over the calibration seeds (unjittered
    jobs), the seeds used and the missing replicates; and the numeric band: std / min / max / n over the jobs of
    one seed that differ only in ``jitter_seed`` (with the unjittered one), where jitter replicates exist."""
    expected = _expected_seeds(runs)
    rows = []
    for (table, group), sub in runs.groupby(["table", "group"], sort=False):
        done = sub[sub["status"] == "complete"]
        seeds_done = done[~_jittered(done)]
        first = sub.iloc[0]
        missing = _missing(sub, expected.get(table, set()))
        jit = done[_jittered(done)]
        band_seed = _seed_int(jit["calib_seed"].iloc[0]) if len(jit) else None
        band = done[done["calib_seed"].map(_seed_int) == band_seed] if band_seed is not None else done.iloc[:0]
        base = {"table": table, "group": group, "model": first["model"], "method": first["method"],
                "label": first.get("label", first["method"]), "seeds": ",".join(map(str, sorted(
                    {_seed_int(s) for s in seeds_done["calib_seed"] if _seed_int(s) is not None}))),
                "missing_seeds": ",".join(missing),
                "band_replicates": ",".join(sorted(_reps(band), key=_rep_key)) if len(jit) else ""}
        for m in metric_columns(runs):
            vals = pd.to_numeric(seeds_done[m], errors="coerce").dropna() if m in seeds_done else pd.Series(dtype=float)
            bvals = pd.to_numeric(band[m], errors="coerce").dropna() if m in band and len(jit) else pd.Series(dtype=float)
            if vals.empty and bvals.empty:
                continue
            row = {**base, "metric": m, "mean": vals.mean(), "std": vals.std(ddof=1) if len(vals) > 1 else np.nan,
                   "min": vals.min(), "max": vals.max(), "n": len(vals)}
            if len(bvals):
                row.update({"band_mean": bvals.mean(), "band_std": bvals.std(ddof=1) if len(bvals) > 1 else np.nan,
                            "band_min": bvals.min(), "band_max": bvals.max(), "band_n": len(bvals)})
            rows.append(row)
    return pd.DataFrame(rows)


def _verdict(mean: float, se: float, n: int, higher_is_better: bool, who: str = "OAC") -> str:
    if n < 2 or not math.isfinite(se):
        return "n/a (n<2)"
    if abs(mean) <= 2 * se:
        return "tie"
    return f"{who} better" if (mean > 0) == higher_is_better else f"{who} worse"


REFERENCE = ("output_adaptive", "per_block")  # the paper's OAC (C5): the second yardstick of every other variant


def _is_reference(df: pd.DataFrame) -> pd.Series:
    if "refresh" not in df or "hessian" not in df:
        return pd.Series(False, index=df.index)
    return (df["hessian"] == REFERENCE[0]) & (df["refresh"] == REFERENCE[1])


def paired(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant configuration, quality metric) and yardstick: the layer-wise backbone of the same
    solver settings in the same table (``against`` = ``backbone``, verdict "OAC better/worse", OAC standing for
    any end-loss variant) and, where the table has it, OAC with per-block refresh (``against`` = ``oac_per_block``,
    verdict "better/worse" than it) for every other variant."""
    expected = _expected_seeds(runs)
    rows = []
    is_oac = runs["variant"].astype(bool)  # a calibrated non-baseline source (oac.hessian registry)
    is_ref = _is_reference(runs)
    for (table, pair), sub in runs.groupby(["table", "pair"], sort=False):
        baseline = sub["calibrated"].astype(bool) & ~is_oac.loc[sub.index]  # the layer-wise backbone
        oac_all, bb_all = sub[is_oac.loc[sub.index]], sub[baseline]
        ref_all = oac_all[is_ref.loc[oac_all.index]]
        for og, oac_sub in oac_all.groupby("group", sort=False):
            for bg, bb_sub in bb_all.groupby("group", sort=False):
                rows += _pair_rows(table, oac_sub, bb_sub, expected.get(table, set()))
            if og in set(ref_all["group"]):
                continue
            for rg, ref_sub in ref_all.groupby("group", sort=False):
                rows += _pair_rows(table, oac_sub, ref_sub, expected.get(table, set()), against="oac_per_block")
    return pd.DataFrame(rows)


def _pair_rows(table: str, oac: pd.DataFrame, bb: pd.DataFrame, expected: set[str],
               against: str = "backbone") -> list[dict]:
    def by_rep(df):
        done = df[df["status"] == "complete"]
        return done.assign(rep=list(_reps(done))).set_index("rep")

    o, b = by_rep(oac), by_rep(bb)
    common = sorted(set(o.index) & set(b.index), key=_rep_key)
    missing = sorted((expected | set(o.index) | set(b.index)) - set(common), key=_rep_key)
    out = []
    for m in [c for c in metric_columns(pd.concat([oac, bb])) if c.startswith(QUALITY)]:
        ov = pd.to_numeric(o.loc[common, m], errors="coerce") if m in o else pd.Series(dtype=float)
        bv = pd.to_numeric(b.loc[common, m], errors="coerce") if m in b else pd.Series(dtype=float)
        ok = ov.notna() & bv.notna()
        ov, bv = ov[ok], bv[ok]
        if ov.empty:
            continue
        log_scale = m.startswith(LOG_SCALE)
        higher = m.startswith(HIGHER_IS_BETTER)
        d = (np.log(ov) - np.log(bv)) if log_scale else (ov - bv)
        n = len(d)
        sd = d.std(ddof=1) if n > 1 else np.nan
        se = sd / math.sqrt(n) if n > 1 else np.nan
        mean = float(d.mean())
        n_jit = sum("/j" in r for r in ov.index)
        # replicates whose two sides were computed in different floating-point environments (another CPU, ...)
        n_mixed = int(sum(o.loc[r].get("environment") != b.loc[r].get("environment") for r in ov.index)) \
            if "environment" in o and "environment" in b else 0
        out.append({
            "table": table, "against": against, "model": oac.iloc[0]["model"], "method": oac.iloc[0]["method"],
            "backbone": bb.iloc[0]["method"], "label": oac.iloc[0].get("label", oac.iloc[0]["method"]),
            "backbone_label": bb.iloc[0].get("label", bb.iloc[0]["method"]),
            "oac_group": oac.iloc[0]["group"], "backbone_group": bb.iloc[0]["group"],
            "metric": m, "scale": "log" if log_scale else "points", "n": n, "n_seeds": n - n_jit, "n_jitter": n_jit,
            "n_mixed_env": n_mixed,
            "seeds": ",".join(ov.index), "missing_seeds": ",".join(missing),
            "backbone_mean": bv.mean(), "backbone_std": bv.std(ddof=1) if n > 1 else np.nan,
            "oac_mean": ov.mean(), "oac_std": ov.std(ddof=1) if n > 1 else np.nan,
            "diff_mean": mean, "diff_sd": sd, "diff_se": se,
            "change_pct": 100 * (math.exp(mean) - 1) if log_scale else np.nan,
            "wins": int((d > 0).sum() if higher else (d < 0).sum()),
            "verdict": _verdict(mean, se, n, higher_is_better=higher, who="OAC" if against == "backbone" else ""
                                ).strip(),
        })
    return out


def _num(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1e4 else f"{v:.3g}"


def _mean_std(mean: float, std: float, n: int) -> str:
    return _num(mean) + (f" ± {_num(std)}" if n > 1 and math.isfinite(std) else "") + f" (n={n})"


def paired_markdown(pairs: pd.DataFrame) -> list[str]:
    """The paired sections of a table's Markdown: every variant vs its layer-wise backbone, then (where the table
    has per-block OAC) every other variant vs per-block OAC. Empty when the table has no pair."""
    if pairs.empty:
        return []
    against = pairs["against"] if "against" in pairs else pd.Series("backbone", index=pairs.index)
    lines = []
    mixed = "n_mixed_env" in pairs and pairs["n_mixed_env"].fillna(0).gt(0).any()
    for kind, title, intro in (
            ("backbone", "## OAC vs its backbone, paired over replicates",
             "A replicate is a calibration seed (`1`: the same windows for both methods) or, at one seed, a numeric "
             "jitter replicate (`0/j1`: every H multiplied by 1 + 2⁻²³u, `jitter_seed`, oac/numerics.py), which "
             "stands for what another machine or thread count does to the last bits. Δ: change of OAC relative to "
             "the backbone, for perplexity and KL the geometric mean of the paired ratio (log scale), for top-1 "
             "agreement and accuracies in points. Verdict: |mean paired difference| > 2 standard errors, else tie; "
             "n < 2 gives none. wins: replicates where OAC is better. Δ ± 2·se: the mean paired difference ± 2 "
             "standard errors (log-scale metrics mapped back, hence asymmetric). \"OAC\" stands for the row's "
             "end-loss Hessian source (OAC or guided)."),
            ("oac_per_block", "## Each variant vs OAC with per-block refresh, paired over replicates",
             "The same test with per-block OAC (the paper's C5) as the yardstick: Δ is the row's configuration "
             "relative to per-block OAC on the same replicates; \"better\" / \"worse\": than per-block OAC, "
             "beyond 2 standard errors.")):
        sub = pairs[against == kind]
        if sub.empty:
            continue
        lines += [title, "", intro + (" *across machines*: replicates whose two sides ran in different "
                                      "floating-point environments (`environment` in the runs CSV)." if mixed else ""),
                  "", "| pair | metric | " + ("backbone" if kind == "backbone" else "OAC per_block")
                  + " | variant | Δ | Δ ± 2·se | wins | verdict | replicates | missing |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in sub.iterrows():
            lines.append(_pair_line(r))
        lines.append("")
    return lines


def _pair_line(r) -> str:
    lo, hi = r["diff_mean"] - 2 * r["diff_se"], r["diff_mean"] + 2 * r["diff_se"]
    if r["scale"] == "log":
        delta = f"{r['change_pct']:+.1f}%"
        band = "—" if not math.isfinite(r["diff_se"]) else \
            f"{100 * (math.exp(lo) - 1):+.1f}% … {100 * (math.exp(hi) - 1):+.1f}%"
    else:
        delta = f"{r['diff_mean']:+.2f}"
        band = "—" if not math.isfinite(r["diff_se"]) else f"{lo:+.2f} … {hi:+.2f}"
    reps = f"{r.get('n_seeds', r['n'])} seeds" + (f" + {r['n_jitter']} jitter" if r.get("n_jitter") else "")
    if r.get("n_mixed_env"):
        reps += f"; {int(r['n_mixed_env'])} across machines"
    other = r["backbone"] if r.get("against", "backbone") == "backbone" else r["backbone_label"]
    return (f"| {r['label']} vs {other} | {metric_name(r['metric'])} | "
            f"{_mean_std(r['backbone_mean'], r['backbone_std'], r['n'])} | "
            f"{_mean_std(r['oac_mean'], r['oac_std'], r['n'])} | {delta} | {band} | {r['wins']}/{r['n']} | "
            f"**{r['verdict']}** | {reps} | {r['missing_seeds'] or '—'} |")


def metric_name(m: str) -> str:
    kind, _, ds = m.partition(":")
    return {"ppl": "ppl", "kl": "KL", "top1": "top-1 %", "zs": "acc"}.get(kind, kind) + (f" {ds}" if ds else "")


def quality_markdown(summary: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """Perplexity, KL to the FP model and top-1 agreement per configuration (mean ± std over seeds), with the
    windows every number was computed over; a set evaluated over different windows in one table is flagged."""
    if summary.empty:
        return []
    metrics = [m for m in dict.fromkeys(summary["metric"]) if m.startswith(("ppl:", "kl:", "top1:"))]
    if not any(m.startswith("kl:") for m in metrics):
        return []
    done = runs[runs["status"] == "complete"]
    windows = {c.split(":", 1)[1]: sorted({int(v) for v in pd.to_numeric(done[c], errors="coerce").dropna()})
               for c in done.columns if c.startswith("windows:")}
    mixed = {d: w for d, w in windows.items() if len(w) > 1}
    order = {m: i for i, m in enumerate(metrics)}
    lines = ["## Perplexity, KL to the full-precision model, top-1 agreement (mean ± std over calibration seeds)", "",
             "KL: mean over predicted tokens of KL(p_FP ‖ p_Q) in nats, full vocabulary, fp32, on the perplexity "
             "windows; top-1: % of tokens whose argmax matches the FP model's. Windows per set: "
             + ", ".join(f"{d} {'/'.join(map(str, w))}" for d, w in windows.items()) + ".", ""]
    if mixed:
        lines += ["**Windows differ within this table** for " + ", ".join(mixed) + ": compare those cells only "
                  "between configurations with the same count (see `windows:<set>` in the runs CSV).", ""]
    lines += ["| configuration | seeds | " + " | ".join(metric_name(m) for m in metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for g, rows in summary[summary["metric"].isin(metrics) & (summary["n"] > 0)].groupby("group", sort=False):
        by = rows.set_index("metric")
        cells = [_mean_std(by.loc[m, "mean"], by.loc[m, "std"], int(by.loc[m, "n"])).replace(
            f" (n={int(by.loc[m, 'n'])})", "") if m in by.index and by.loc[m, "n"] > 0 else "—"
            for m in sorted(by.index, key=order.get)]
        lines.append(f"| {rows.iloc[0]['label']} | {rows.iloc[0]['seeds'] or '—'} | " + " | ".join(cells) + " |")
    return lines + [""]


def band_markdown(summary: pd.DataFrame) -> list[str]:
    """The numeric band (jitter replicates at one seed) next to the calibration-seed spread, per configuration."""
    if summary.empty or "band_n" not in summary:
        return []
    sub = summary[summary["band_n"].fillna(0) > 1]
    sub = sub[sub["metric"].str.startswith(("ppl:", "kl:", "top1:"))]
    if sub.empty:
        return []
    lines = ["## Numeric band vs calibration-seed spread", "",
             "Seed spread: std over calibration seeds (unjittered jobs). Numeric band: the jobs of one seed that "
             "differ only in `jitter_seed` (a one-ulp perturbation of every H; the unjittered job included): std and "
             "range. Relative to the mean for perplexity and KL. Where the band is comparable to the seed spread, "
             "a number from another machine or thread count can differ by as much as a number from another seed.", "",
             "| configuration | metric | seeds: mean ± std | seed spread | replicates | band: mean ± std | band range "
             "| band / seed spread |", "|---|---|---|---|---|---|---|---|"]

    def rel(std, mean, m):
        return "—" if not math.isfinite(std) else (f"{100 * std / mean:.1f}%" if m.startswith(("ppl:", "kl:"))
                                                   else f"{std:.2f} pt")
    for _, r in sub.iterrows():
        ratio = r["band_std"] / r["std"] if math.isfinite(r["std"]) and r["std"] > 0 else float("nan")
        lines.append(f"| {r['label']} | {metric_name(r['metric'])} | {_mean_std(r['mean'], r['std'], int(r['n']))} | "
                     f"{rel(r['std'], r['mean'], r['metric'])} | {r['band_replicates']} | "
                     f"{_mean_std(r['band_mean'], r['band_std'], int(r['band_n']))} | "
                     f"{_num(r['band_min'])} … {_num(r['band_max'])} | {'—' if not math.isfinite(ratio) else f'{ratio:.2f}'} |")
    return lines + [""]


SUMMARY_METRICS = {"bits_reported": "bits (reported)", "bits_full": "bits (full)", "outlier_fraction": "outliers",
                   "salient_fraction": "salient", "time_hessian_s": "Hessian phase (s)",
                   "hessian_block_passes": "block passes", "time_quantize_s": "quantization (s)",
                   "time_total_s": "job (s)", "hessian_pass_gb": "Ĥ held (GB)", "peak_rss_gb": "peak RSS (GB)",
                   "peak_cuda_gb": "peak CUDA (GB)"}


def summary_markdown(summary: pd.DataFrame, runs: pd.DataFrame | None = None) -> list[str]:
    """Bits, outlier/salient fractions and times per configuration (mean ± std over seeds)."""
    if summary.empty:
        return []
    cached, partly = set(), set()
    if runs is not None and "hessian_cache_hits" in runs:
        hits = pd.to_numeric(runs["hessian_cache_hits"], errors="coerce").fillna(0)
        misses = pd.to_numeric(runs.get("hessian_cache_misses"), errors="coerce").fillna(0)
        cached = set(runs.loc[(hits > 0) & (misses == 0), "group"])
        partly = set(runs.loc[(hits > 0) & (misses > 0), "group"]) - cached
    sub = summary[summary["metric"].isin(list(SUMMARY_METRICS)) & (summary["n"] > 0)]
    if sub.empty:
        return []
    cols = [m for m in SUMMARY_METRICS if m in set(sub["metric"])]
    lines = ["## Bits, outliers, time and memory per configuration (mean ± std over seeds)", "",
             "| configuration | seeds | " + " | ".join(SUMMARY_METRICS[c] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for g, rows in sub.groupby("group", sort=False):
        by = rows.set_index("metric")
        cells = []
        for c in cols:
            if c not in by.index:
                cells.append("—")
                continue
            r = by.loc[c]
            fmt = (lambda v: f"{100 * v:.2f}%") if c.endswith("fraction") else (
                (lambda v: f"{v:.0f}") if c.startswith("time") or c.endswith("passes") else
                (lambda v: f"{v:.2f}") if c.endswith("_gb") else (lambda v: f"{v:.3f}"))
            cells.append(fmt(r["mean"]) + (f" ± {fmt(r['std'])}" if r["n"] > 1 and math.isfinite(r["std"]) else ""))
        label = rows.iloc[0]["label"] + (" (Ĥ from the cache)" if g in cached else
                                          " (Ĥ partly from the cache)" if g in partly else "")
        lines.append(f"| {label} | {rows.iloc[0]['seeds'] or '—'} | " + " | ".join(cells) + " |")
    if cached or partly:
        lines.append("\n(Ĥ from the cache): a job of this configuration reloaded all its Ĥ (`oac_cache_dir`), so its "
                     "Hessian time is not the cost of computing them; *partly*: some blocks' Ĥ (e.g. block 0, which "
                     "is the same for every OAC method on the same windows) were reloaded.")
    return lines + [""]


def missing_markdown(summary: pd.DataFrame) -> list[str]:
    """Configurations with missing seeds (absent or not complete jobs)."""
    if summary.empty:
        return []
    miss = summary[summary["missing_seeds"] != ""].drop_duplicates("group")
    if miss.empty:
        return []
    return ["Missing seeds (job absent or not complete; statistics use the complete seeds only): "
            + "; ".join(f"{r['label']}: {r['missing_seeds']}" for _, r in miss.iterrows()), ""]
