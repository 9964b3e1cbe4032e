"""The refresh frontier: what an end-loss Hessian's refresh schedule costs and what it buys (issue #18).

A *family* is a set of configurations that differ only in how often the source recomputes its Hessians
(``refresh`` = per_block | every r | once; ``oac.rows.family_key``), e.g. OAC-SpQR w2 at per_block, every 2, 4, 8
and once. Per configuration of a family with at least two schedules:

* cost: what the job's Hessians cost to compute (``oac.rows.hessian_cost``: the Hessian phase's time and block
  forward+backward passes, plus, for Ĥ reloaded from the cache, the cost recorded when they were computed; mean
  ± std over seeds), relative to the family's per_block point. Where a reloaded Ĥ has no recorded cost the
  figures are lower bounds, marked ≥ (``lower_bound``): a reload is never shown as the cost;
* quality: perplexity and KL per set (mean ± std over seeds), and *gain kept*: over the calibration seeds complete
  for the configuration, the family's per_block point and the layer-wise backbone, the mean of ln(config /
  backbone) divided by the mean of ln(per_block / backbone) (1 = all of per-block's gain, 0 = none, negative =
  worse than the backbone; jitter replicates are left out, they exist for some configurations only). Defined only
  where per_block's gain is decided by the paired test (``per_block_gain_decided``): a share of a gain within the
  noise is noise divided by noise (on one machine per_block ties the backbone on WikiText2 and "kept" read −2 … 5).

:func:`plot_frontier` draws quality against Hessian-phase time with error bars (the notebook and the report).
A family whose rows (or backbone) were computed in more than one floating-point environment (another CPU, dispatch
level or thread count: ``environment`` in result.json) names each row's machines, in the table and on the plot:
its times are then not comparable, and 2-bit results move across machines (experiments/machines.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.seeds import _mean_std, metric_name

QUALITY = ("ppl:", "kl:")
ORDER = {"per_block": 0, "once": 10_000}  # every<r>: r
COST_S, COST_PASSES = "hessian_cost_s", "hessian_cost_passes"  # oac.rows.hessian_cost


def _refresh_rank(r: str | None) -> int:
    if r in ORDER:
        return ORDER[r]
    return int(r.removeprefix("every")) if isinstance(r, str) and r.startswith("every") else 5_000


def frontier(runs: pd.DataFrame, summary: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration of a family with ≥ 2 refresh schedules, metric)."""
    if runs.empty or "family" not in runs or "refresh" not in runs:
        return pd.DataFrame()
    done = runs[(runs["status"] == "complete") & runs["variant"].astype(bool) & runs["refresh"].notna()]
    out = []
    for (table, fam), sub in done.groupby(["table", "family"], sort=False):
        groups = sub.drop_duplicates("group")
        if groups["refresh"].nunique() < 2:
            continue
        stats = summary[summary["group"].isin(groups["group"])].set_index(["group", "metric"])
        bb_groups = set(pairs[(pairs["against"] == "backbone") & pairs["oac_group"].isin(groups["group"])]
                        ["backbone_group"]) if not pairs.empty else set()
        bb = next(iter(sorted(bb_groups)), None)  # the layer-wise backbone of the family (one per pair key)
        pb = groups[groups["refresh"] == "per_block"]["group"]
        pb = pb.iloc[0] if len(pb) else None
        seeds = runs[(runs["status"] == "complete") & runs["group"].isin({*groups["group"], bb})]
        seeds = seeds[pd.to_numeric(seeds["jitter_seed"], errors="coerce").isna()] if "jitter_seed" in seeds else seeds

        def stat(g, m, k="mean"):
            return stats.loc[(g, m), k] if (g, m) in stats.index else float("nan")

        def kept(g, m) -> tuple[float, bool]:
            """(mean over the seeds complete for g, per_block and the backbone of ln(g/bb), over the same for pb;
            whether per_block's gain is decided). A share of a gain that the paired test does not find
            (ln(pb/bb) not below 0 by 2 standard errors, or < 2 seeds) is not defined: NaN, False."""
            if bb is None or pb is None or m not in seeds:
                return np.nan, True
            piv = seeds.assign(v=pd.to_numeric(seeds[m], errors="coerce")).pivot_table(
                index="calib_seed", columns="group", values="v", aggfunc="first")
            if not {g, pb, bb} <= set(piv.columns):
                return np.nan, True
            piv = np.log(piv[list(dict.fromkeys([g, pb, bb]))].dropna())
            d_pb = piv[pb] - piv[bb]
            decided = len(d_pb) >= 2 and d_pb.mean() + 2 * d_pb.std(ddof=1) / math.sqrt(len(d_pb)) < 0
            if not decided:
                return np.nan, False
            return float((piv[g] - piv[bb]).mean() / d_pb.mean()), True

        bb_stats = summary[summary["group"] == bb].set_index("metric") if bb else pd.DataFrame()
        for _, g in groups.sort_values("refresh", key=lambda c: c.map(_refresh_rank)).iterrows():
            base = {"table": table, "family": fam, "group": g["group"], "label": g.get("label", g["method"]),
                    "method": g["method"], "hessian": g["hessian"], "refresh": g["refresh"],
                    "n": int((seeds["group"] == g["group"]).sum()),
                    "environments": _environments(seeds, g["group"]),
                    "lower_bound": "hessian_cost_exact" in done and not done.loc[
                        done["group"] == g["group"], "hessian_cost_exact"].fillna(True).astype(bool).all(),
                    "hessian_s": stat(g["group"], COST_S), "hessian_s_std": stat(g["group"], COST_S, "std"),
                    "block_passes": stat(g["group"], COST_PASSES),
                    "cost_vs_per_block": stat(g["group"], COST_S) / stat(pb, COST_S) if pb else np.nan,
                    "passes_vs_per_block": stat(g["group"], COST_PASSES) / stat(pb, COST_PASSES)
                    if pb else np.nan, "backbone_group": bb,
                    "backbone_environments": _environments(seeds, bb)}
            for m in [m for m in dict.fromkeys(summary["metric"]) if m.startswith(QUALITY)]:
                has_bb = m in bb_stats.index
                out.append({**base, "metric": m, "mean": stat(g["group"], m), "std": stat(g["group"], m, "std"),
                            "n_metric": int(stat(g["group"], m, "n")) if (g["group"], m) in stats.index else 0,
                            **dict(zip(("gain_kept", "per_block_gain_decided"), kept(g["group"], m))),
                            "backbone_mean": bb_stats.loc[m, "mean"] if has_bb else np.nan,
                            "backbone_std": bb_stats.loc[m, "std"] if has_bb else np.nan,
                            "backbone_n": int(bb_stats.loc[m, "n"]) if has_bb else 0})
    return pd.DataFrame(out)


def _environments(runs: pd.DataFrame, group) -> str:
    """The floating-point environments (oac.environment.summary) of a configuration's runs, ``; ``-joined."""
    if "environment" not in runs:
        return ""
    return "; ".join(sorted(runs.loc[runs["group"] == group, "environment"].dropna().astype(str).unique()))


def machine_letters(family: pd.DataFrame) -> dict[str, str]:
    """{environment: "A", ...} over a family's rows and its backbone when they span > 1 environment, else {}."""
    if "environments" not in family:
        return {}
    envs = sorted({e for v in [*family["environments"], *family["backbone_environments"]]
                   for e in str(v).split("; ") if e and e != "nan"})
    return {e: chr(65 + i) for i, e in enumerate(envs)} if len(envs) > 1 else {}


def _machines(envs, letter: dict[str, str]) -> str:
    return ",".join(letter[e] for e in str(envs).split("; ") if e in letter)


def _true(v) -> bool:
    """A flag read back from a CSV or a frame (bool, "True"/"False", NaN = not recorded = True)."""
    return v if isinstance(v, (bool, np.bool_)) else str(v) != "False"


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None or not math.isfinite(v) else fmt.format(v)


def frontier_markdown(front: pd.DataFrame) -> list[str]:
    if front.empty:
        return []
    metrics = list(dict.fromkeys(front["metric"]))
    lines = ["## Refresh frontier: what the Hessian refresh costs and what it buys", "",
             "Per family (configurations that differ only in `refresh`): Hessian phase = what the job's Hessians "
             "cost to compute (`time_s.calib_hessian`, mean ± std over seeds; wall time, one thread), block passes "
             "= block forward+backward passes (`hessian.stats.block_passes`, machine-independent). Ĥ reloaded from "
             "the cache count at the cost recorded when they were computed (`hessian.stats.cached_*`); ≥: a lower "
             "bound, some job of the row reloaded Ĥ whose cost was not recorded (cache entries from before it was). "
             "cost = Hessian-phase time relative to the "
             "family's per_block point. *kept*: the "
             "share of per_block's mean paired log-gain over the layer-wise backbone that this schedule keeps (1 = "
             "all, 0 = none, < 0 = worse than the backbone); n/d: not defined, per_block's own gain over the "
             "backbone is not decided by the paired test (2 standard errors, ≥ 2 seeds), so there is no gain to keep; "
             "verdicts vs the backbone are in the paired section.", ""]
    for fam, sub in front.groupby("family", sort=False):
        first = sub.iloc[0]
        letter = machine_letters(sub)
        mixed = bool(letter)
        lines += [f"### {first['label'].split(' [')[0]} ({first['hessian']})", ""]
        if mixed:  # each row names its machines: times, and paired differences across them, are not like for like
            lines += ["**This family mixes floating-point environments** (column *machine*): "
                      + "; ".join(f"{v} = {e}" for e, v in letter.items()) + ". Hessian-phase times "
                      "of different machines are not comparable (block passes are), and *kept* and the paired "
                      "verdicts of rows on different machines include the cross-machine difference of 2-bit "
                      "results (experiments/machines.py measures it).", ""]

        def machine(v) -> str:
            return _machines(v, letter)

        lines += ["| refresh | seeds | " + ("machine | " if mixed else "")
                  + "Hessian phase (s) | cost | block passes | "
                  + " | ".join(metric_name(m) for m in metrics) + " | "
                  + " | ".join(f"kept {metric_name(m)}" for m in metrics) + " |",
                  "|---|---|---|---|---|" + ("---|" if mixed else "") + "---|" * (2 * len(metrics))]
        for g, rows in sub.groupby("group", sort=False):
            by = rows.set_index("metric")
            r = rows.iloc[0]
            q = [_mean_std(by.loc[m, "mean"], by.loc[m, "std"], int(by.loc[m, "n_metric"])).rsplit(" (n=", 1)[0]
                 if m in by.index else "—" for m in metrics]
            kept = ["n/d" if m in by.index and not _true(by.loc[m, "per_block_gain_decided"])
                    else _f(by.loc[m, "gain_kept"]) if m in by.index else "—" for m in metrics]
            ge = "≥ " if r["lower_bound"] else ""
            lines.append(f"| {r['refresh']} | {r['n']} | " + (f"{machine(r['environments'])} | " if mixed else "")
                         + f"{ge}{_f(r['hessian_s'], '{:.0f}')}"
                         + (f" ± {_f(r['hessian_s_std'], '{:.0f}')}" if r["n"] > 1 else "")
                         + f" | {_f(r['cost_vs_per_block'])} | {ge}{_f(r['block_passes'], '{:.0f}')} | "
                         + " | ".join(q) + " | " + " | ".join(kept) + " |")
        bb = sub.drop_duplicates("metric").set_index("metric")
        if bb["backbone_mean"].notna().any():
            where = f"{machine(first['backbone_environments'])} | " if mixed else ""
            lines.append("| *layer-wise backbone* | | " + where
                         + "— | — | — | " + " | ".join(
                _mean_std(bb.loc[m, "backbone_mean"], bb.loc[m, "backbone_std"], int(bb.loc[m, "backbone_n"])
                          ).rsplit(" (n=", 1)[0]
                if m in bb.index and math.isfinite(bb.loc[m, "backbone_mean"]) else "—" for m in metrics)
                + " |" + " |" * len(metrics))
        lines.append("")
    return lines


def plot_frontier(front: pd.DataFrame, path: str | Path | None = None):
    """Quality (rows: ppl, KL; columns: sets) against Hessian-phase time, error bars = std over seeds, one line per
    family, the layer-wise backbone as a dashed line with its ± std band. Saves to ``path`` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("ppl", "kl") if front["metric"].str.startswith(k + ":").any()]
    sets = list(dict.fromkeys(m.split(":", 1)[1] for m in front["metric"]))
    fig, axes = plt.subplots(len(kinds), len(sets), figsize=(5.2 * len(sets), 3.8 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, ds in enumerate(sets):
            ax = axes[i][j]
            sub = front[front["metric"] == f"{kind}:{ds}"]
            for fam, f in sub.groupby("family", sort=False):
                name = f"{f.iloc[0]['label'].split(' [')[0]} ({f.iloc[0]['hessian']})"
                letter = machine_letters(front[front["family"] == fam])  # {} unless the family mixes machines
                ax.errorbar(f["hessian_s"], f["mean"], xerr=f["hessian_s_std"], yerr=f["std"], marker="o",
                            capsize=3, label=name)
                for _, r in f.iterrows():
                    where = f" ({_machines(r['environments'], letter)})" if letter else ""
                    ax.annotate(("≥ " if r.get("lower_bound") else "") + r["refresh"] + where,
                                (r["hessian_s"], r["mean"]),
                                textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
            bb = sub.dropna(subset=["backbone_mean"])
            if len(bb):
                m, s = bb["backbone_mean"].iloc[0], bb["backbone_std"].iloc[0]
                ax.axhline(m, ls="--", color="grey", label="layer-wise backbone")
                if math.isfinite(s):
                    ax.axhspan(m - s, m + s, color="grey", alpha=0.15)
            x = pd.to_numeric(sub["hessian_s"], errors="coerce")
            log_x = bool((x > 0).any()) and not bool((x <= 0).any())  # a zero or missing time: linear axis
            if log_x:
                ax.set_xscale("log")
            ax.set_xlabel("Hessian phase (s, log)" if log_x else "Hessian phase (s)")
            ax.set_ylabel(f"{metric_name(f'{kind}:{ds}')} (mean ± std over seeds)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
