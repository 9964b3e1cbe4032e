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
HIGHER_IS_BETTER = ("zs:",)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Metrics of a per-job frame: perplexities and accuracies first, then bits and times."""
    quality = [c for c in runs.columns if c.startswith(("ppl:", "zs:"))]
    return quality + [c for c in BITS + TIMES if c in runs.columns]


def _seed_int(s) -> int | None:
    return None if s is None or (isinstance(s, float) and math.isnan(s)) else int(s)


def _expected_seeds(runs: pd.DataFrame) -> dict[str, set[int]]:
    """Per table: every calibration seed seen in a calibrated job of the table."""
    calibrated = runs[runs["calibrated"].astype(bool)] if "calibrated" in runs else runs
    return {t: {s for s in map(_seed_int, sub["calib_seed"]) if s is not None}
            for t, sub in calibrated.groupby("table")}


def _missing(sub: pd.DataFrame, expected: set[int]) -> list[int]:
    if "calibrated" in sub and not sub["calibrated"].astype(bool).any():
        return []
    done = {_seed_int(s) for s in sub.loc[sub["status"] == "complete", "calib_seed"]}
    return sorted(expected - done)


def seed_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, metric): mean, std (n > 1), min, max, n, the seeds used and the missing ones."""
    expected = _expected_seeds(runs)
    rows = []
    for (table, group), sub in runs.groupby(["table", "group"], sort=False):
        done = sub[sub["status"] == "complete"]
        first = sub.iloc[0]
        missing = _missing(sub, expected.get(table, set()))
        base = {"table": table, "group": group, "model": first["model"], "method": first["method"],
                "label": first.get("label", first["method"]), "seeds": ",".join(map(str, sorted(
                    {_seed_int(s) for s in done["calib_seed"] if _seed_int(s) is not None}))),
                "missing_seeds": ",".join(map(str, missing))}
        for m in metric_columns(runs):
            vals = pd.to_numeric(done[m], errors="coerce").dropna() if m in done else pd.Series(dtype=float)
            if vals.empty:
                continue
            rows.append({**base, "metric": m, "mean": vals.mean(), "std": vals.std(ddof=1) if len(vals) > 1 else np.nan,
                         "min": vals.min(), "max": vals.max(), "n": len(vals)})
    return pd.DataFrame(rows)


def _verdict(mean: float, se: float, n: int, higher_is_better: bool) -> str:
    if n < 2 or not math.isfinite(se):
        return "n/a (n<2)"
    if abs(mean) <= 2 * se:
        return "tie"
    return "OAC better" if (mean > 0) == higher_is_better else "OAC worse"


def paired(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (OAC configuration, quality metric) that has a backbone configuration in the same table."""
    expected = _expected_seeds(runs)
    rows = []
    is_oac = runs["variant"].astype(bool)  # a calibrated non-baseline source (oac.hessian registry)
    for (table, pair), sub in runs.groupby(["table", "pair"], sort=False):
        baseline = sub["calibrated"].astype(bool) & ~is_oac.loc[sub.index]  # the layer-wise backbone
        oac_all, bb_all = sub[is_oac.loc[sub.index]], sub[baseline]
        if oac_all.empty or bb_all.empty:
            continue
        for og, oac_sub in oac_all.groupby("group", sort=False):
            for bg, bb_sub in bb_all.groupby("group", sort=False):
                rows += _pair_rows(table, oac_sub, bb_sub, expected.get(table, set()))
    return pd.DataFrame(rows)


def _pair_rows(table: str, oac: pd.DataFrame, bb: pd.DataFrame, expected: set[int]) -> list[dict]:
    def by_seed(df):
        done = df[df["status"] == "complete"]
        return done.assign(seed=[_seed_int(s) for s in done["calib_seed"]]).set_index("seed")

    o, b = by_seed(oac), by_seed(bb)
    common = sorted(set(o.index) & set(b.index))
    missing = sorted((expected | set(o.index) | set(b.index)) - set(common))
    out = []
    for m in [c for c in metric_columns(pd.concat([oac, bb])) if c.startswith(("ppl:", "zs:"))]:
        ov = pd.to_numeric(o.loc[common, m], errors="coerce") if m in o else pd.Series(dtype=float)
        bv = pd.to_numeric(b.loc[common, m], errors="coerce") if m in b else pd.Series(dtype=float)
        ok = ov.notna() & bv.notna()
        ov, bv = ov[ok], bv[ok]
        if ov.empty:
            continue
        log_scale = m.startswith("ppl:")
        d = (np.log(ov) - np.log(bv)) if log_scale else (ov - bv)
        n = len(d)
        sd = d.std(ddof=1) if n > 1 else np.nan
        se = sd / math.sqrt(n) if n > 1 else np.nan
        mean = float(d.mean())
        out.append({
            "table": table, "model": oac.iloc[0]["model"], "method": oac.iloc[0]["method"],
            "backbone": bb.iloc[0]["method"], "label": oac.iloc[0].get("label", oac.iloc[0]["method"]),
            "backbone_label": bb.iloc[0].get("label", bb.iloc[0]["method"]),
            "oac_group": oac.iloc[0]["group"], "backbone_group": bb.iloc[0]["group"],
            "metric": m, "scale": "log" if log_scale else "points", "n": n, "seeds": ",".join(map(str, ov.index)),
            "missing_seeds": ",".join(map(str, missing)),
            "backbone_mean": bv.mean(), "backbone_std": bv.std(ddof=1) if n > 1 else np.nan,
            "oac_mean": ov.mean(), "oac_std": ov.std(ddof=1) if n > 1 else np.nan,
            "diff_mean": mean, "diff_sd": sd, "diff_se": se,
            "change_pct": 100 * (math.exp(mean) - 1) if log_scale else np.nan,
            "wins": int((d < 0).sum() if log_scale else (d > 0).sum()),
            "verdict": _verdict(mean, se, n, higher_is_better=not log_scale),
        })
    return out


def _num(v: float) -> str:
    return "—" if v is None or not math.isfinite(v) else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.3g}")


def _mean_std(mean: float, std: float, n: int) -> str:
    return _num(mean) + (f" ± {_num(std)}" if n > 1 and math.isfinite(std) else "") + f" (n={n})"


def paired_markdown(pairs: pd.DataFrame) -> list[str]:
    """The paired section of a table's Markdown (empty when the table has no OAC/backbone pair)."""
    if pairs.empty:
        return []
    lines = ["## OAC vs its backbone, paired over calibration seeds", "",
             "Same seed = same calibration windows. Δ: perplexity change of OAC relative to the backbone "
             "(geometric mean over seeds, from the paired log-ratio), accuracy in points. Verdict: "
             "|mean paired difference| > 2 standard errors, else tie; n < 2 gives none. wins: seeds where OAC is "
             "better. Δ ± 2·se: the mean paired difference ± 2 standard errors (for perplexity mapped back from the "
             "log-ratio, hence asymmetric); the verdict is not a tie when this range excludes 0.", "",
             "| pair | metric | backbone | OAC | Δ | Δ ± 2·se | wins | verdict | missing seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in pairs.iterrows():
        lo, hi = r["diff_mean"] - 2 * r["diff_se"], r["diff_mean"] + 2 * r["diff_se"]
        if r["scale"] == "log":
            delta = f"{r['change_pct']:+.1f}%"
            band = "—" if not math.isfinite(r["diff_se"]) else \
                f"{100 * (math.exp(lo) - 1):+.1f}% … {100 * (math.exp(hi) - 1):+.1f}%"
        else:
            delta = f"{r['diff_mean']:+.2f}"
            band = "—" if not math.isfinite(r["diff_se"]) else f"{lo:+.2f} … {hi:+.2f}"
        lines.append(f"| {r['label']} vs {r['backbone']} | {r['metric']} | "
                     f"{_mean_std(r['backbone_mean'], r['backbone_std'], r['n'])} | "
                     f"{_mean_std(r['oac_mean'], r['oac_std'], r['n'])} | {delta} | {band} | {r['wins']}/{r['n']} | "
                     f"**{r['verdict']}** | {r['missing_seeds'] or '—'} |")
    return lines + [""]


SUMMARY_METRICS = {"bits_reported": "bits (reported)", "bits_full": "bits (full)", "outlier_fraction": "outliers",
                   "salient_fraction": "salient", "time_hessian_s": "Hessian phase (s)",
                   "time_quantize_s": "quantization (s)", "time_total_s": "job (s)"}


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
    sub = summary[summary["metric"].isin(list(SUMMARY_METRICS))]
    if sub.empty:
        return []
    cols = [m for m in SUMMARY_METRICS if m in set(sub["metric"])]
    lines = ["## Bits, outliers and time per configuration (mean ± std over seeds)", "",
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
                (lambda v: f"{v:.0f}") if c.startswith("time") else (lambda v: f"{v:.3f}"))
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
