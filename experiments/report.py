"""`make report`: aggregate every result.json under outputs/ into results/<table>.csv / .md.

    python -m experiments.report [--outputs outputs] [--results results]

For every table (a job's ``tag``: table1, table2_cpu, ...; every experiment sweep sets one; jobs without a tag
are reported as table ``adhoc`` only with ``--include-untagged``):

* ``results/<table>_runs.csv``: one row per job (failed ones included, with their status);
* ``results/<table>.csv``: long format, one row per (configuration, metric): configurations group every
  job whose config differs only in ``calib.seed``; ``value`` is the mean over seeds, with ``std``, ``min``,
  ``max`` and ``n``.
  Each row is joined with the reference cells of ``results/paper/*.csv`` (OAC paper cell and best literature
  cell, with status, source and a comparability flag);
* ``results/<table>_seeds.csv``: every metric (ppl, zero-shot, bits, outlier/salient fraction, times) of every
  configuration over seeds (mean/std/min/max/n, missing seeds); ``results/<table>_paired.csv``: OAC vs its
  backbone, paired over seeds, with the 2-standard-error verdict (``experiments/seeds.py``);
* ``results/<table>.md``: the paper-style layout (rows: models; columns: method x dataset, with the
  reported average bits), missing seeds, the paired OAC-vs-backbone verdicts, then the reference cells.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pandas as pd

from oac import hessian
from oac.jobdir import RESULT_FILE
from oac.jobdir.identity import identity_config
from experiments.seeds import (band_markdown, missing_markdown, paired, paired_markdown, quality_markdown,
                               seed_summary, summary_markdown)
from experiments.frontier import frontier, frontier_markdown, plot_frontier
from oac.rows import BITS, group_key, result_row  # noqa: F401  (result_row: public API)

log = logging.getLogger("report")

METRIC_PREFIXES = ("ppl:", "kl:", "top1:", "zs:")
PIVOT_METRICS = ("ppl", "zs")  # the paper-style layout; KL and top-1 have their own section
PAPER_SCALE = {"calib_nsamples": 128, "calib_seqlen": 2048, "eval_seqlen": 2048}
# our perplexity dataset -> (reference dataset, protocols that match it exactly)
DATASET_MAP = {"wikitext2": ("wikitext2", {"wikitext2@2048"}), "c4-new": ("c4", {"c4-new"}),
               "c4": ("c4", {"c4-old"}), "ptb-new": ("ptb", {"ptb-new"}), "ptb": ("ptb", {"ptb"})}


# ------------------------------------------------------------------------------------------- rows


def find_results(root: str | Path) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            out.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", path, e)
    return out


def runs_frame(root: str | Path) -> pd.DataFrame:
    return pd.DataFrame([result_row(r, d) for d, r in find_results(root)])


# -------------------------------------------------------------------------------------- aggregate


def _label(row) -> str:
    if row["method"] == "fp16" or pd.isna(row.get("wbits")):  # fp16 and binary methods (no bit-width setting)
        return str(row["method"])
    return f"{row['method']} w{int(row['wbits'])}"


def _short(key: str) -> str:
    """A setting's name in a label: without ``method.`` and a Hessian source's options key (``oac.``, ``guided.``)."""
    key = key.removeprefix("method.")
    for opt in hessian.option_keys():
        key = key.removeprefix(f"{opt}.")
    return key


def _moot(key: str, flat: dict[str, str]) -> bool:
    """``refresh_every`` of a source whose ``refresh`` is not ``every`` (per_block, once) changes nothing."""
    if not key.endswith("refresh_every"):
        return False
    return flat.get(key.removesuffix("_every")) != json.dumps("every")


def _varying_settings(results: dict[str, dict], groups: pd.DataFrame) -> dict[str, str]:
    """Extra label text for configurations that share (table, model, label): the settings that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = json.dumps(v)
        return out

    extra = {}
    for _, sub in groups.groupby(["table", "model", "label"]):
        if len(sub) < 2:
            continue
        # what identifies a job (locations, threads, ... never enter a label), up to its replicates
        flats = {g: flat(identity_config(results[g])) for g in sub["group"]}
        keys = sorted({k for f in flats.values() for k in f})
        skip = ("paths.", "calib.seed", "jitter_seed")
        diff = [k for k in keys if not k.startswith(skip) and len({f.get(k) for f in flats.values()}) > 1]
        for g, f in flats.items():
            extra[g] = ", ".join(f"{_short(k)}={json.loads(f.get(k, 'null'))}" for k in diff
                                 if not _moot(k, f))
    return extra


def aggregate(runs: pd.DataFrame, configs: dict[str, dict]) -> pd.DataFrame:
    """Long format over complete runs: one row per (configuration, metric) with mean/std/n over seeds
    (numeric-jitter replicates are left out: they measure the band, ``experiments/seeds.py``)."""
    done = runs[runs["status"] == "complete"].copy()
    if "jitter_seed" in done:
        done = done[pd.to_numeric(done["jitter_seed"], errors="coerce").isna()]
    if done.empty:
        return pd.DataFrame()
    done["label"] = done.apply(_label, axis=1)
    metrics = [c for c in done.columns if c.startswith(METRIC_PREFIXES)]
    ident = ["table", "model", "method", "backbone", "order", "wbits", "groupsize", "label", "calib_dataset", "calib_nsamples",
             "calib_seqlen", "eval_seqlen", "max_windows", "device"]
    rows = []
    for g, sub in done.groupby("group", sort=False):
        base = {k: sub.iloc[0][k] for k in ident}
        base.update({"group": g, "seeds": ",".join(str(s) for s in sorted(sub["calib_seed"].dropna().unique()))})
        base.update({k: sub[k].mean() for k in BITS if k in sub and sub[k].notna().any()})
        for m in metrics:
            vals = sub[m].dropna()
            if vals.empty:
                continue
            rows.append({**base, "metric": m.split(":")[0], "dataset": m.split(":", 1)[1], "value": vals.mean(),
                         "std": vals.std(ddof=1) if len(vals) > 1 else float("nan"), "min": vals.min(),
                         "max": vals.max(), "n": len(vals)})
    long = pd.DataFrame(rows)
    extra = _varying_settings(configs, long.drop_duplicates("group"))
    long["label"] = [f"{lab} [{extra[g]}]" if extra.get(g) else lab for lab, g in zip(long["label"], long["group"])]
    return long


# ------------------------------------------------------------------------------------- references


def load_refs(paper_dir: str | Path) -> pd.DataFrame:
    files = sorted(Path(paper_dir).glob("*.csv"))
    if not files:
        return pd.DataFrame(columns=["table", "model", "method", "bits_label", "dataset", "protocol", "metric",
                                     "value", "status", "source"])
    return pd.concat([pd.read_csv(f, dtype={"bits_label": str}, keep_default_na=False, na_values={"value": [""]})
                      for f in files], ignore_index=True)


def _nominal(method: str, bits_label: str) -> float | None:
    if method == "fp16":
        return 16.0
    try:
        v = float(str(bits_label).split()[0])
    except ValueError:
        return None
    return 1.0 if v < 1.5 else v  # binary methods report ~1.1 average bits


def _ref_match(refs: pd.DataFrame, row) -> tuple[pd.DataFrame, set]:
    dataset, protocols = DATASET_MAP.get(row["dataset"], (row["dataset"], set()))
    metric = "ppl" if row["metric"] == "ppl" else "acc"
    m = refs[(refs["model"] == row["model"]) & (refs["method"] == row["method"]) & (refs["dataset"] == dataset)
             & (refs["metric"] == metric)]
    return m, protocols


def join_refs(long: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """Add the OAC-paper cell (paper_*) and the best literature cell (lit_*) of each row, and comparability."""
    if long.empty:
        return long
    status_rank = {"verified": 0, "unverified": 1, "missing": 2}
    out = []
    for _, row in long.iterrows():
        r = row.to_dict()
        m, protocols = _ref_match(refs, row)
        table = str(row["table"]).removesuffix("_cpu")
        paper = m[m["table"] == table]
        wb = 16.0 if row["method"] == "fp16" else 1.0 if pd.isna(row["wbits"]) else row["wbits"]
        lit = m[(m["table"] == "literature") & (m["value"].notna())]
        lit = lit[[_nominal(a, b) == wb and "g128" not in str(b) for a, b in zip(lit["method"], lit["bits_label"])]]
        if not lit.empty:
            lit = lit.assign(_exact=[p not in protocols for p in lit["protocol"]],
                             _rank=[status_rank.get(s, 3) for s in lit["status"]]).sort_values(["_exact", "_rank"])
        p = paper.iloc[0] if not paper.empty else None
        q = lit.iloc[0] if not lit.empty else None
        r.update({"paper_value": None if p is None else p["value"], "paper_status": None if p is None else p["status"],
                  "lit_value": None if q is None else q["value"], "lit_status": None if q is None else q["status"],
                  "lit_protocol": None if q is None else q["protocol"], "lit_source": None if q is None else q["source"],
                  "lit_bits_label": None if q is None else q["bits_label"]})
        reasons = []
        if any(row.get(k) != v for k, v in PAPER_SCALE.items()):
            reasons.append("not paper scale (calibration or seqlen)")
        if row.get("max_windows") is not None and not pd.isna(row.get("max_windows")):
            reasons.append("window-limited evaluation")
        if q is not None and q["protocol"] not in protocols and row["metric"] == "ppl":
            reasons.append(f"protocol differs ({row['dataset']} vs {q['protocol']})")
        r["comparable"] = q is not None and not reasons
        r["comparability_note"] = "; ".join(reasons)
        out.append(r)
    return pd.DataFrame(out)


# -------------------------------------------------------------------------------------- markdown


def _fmt(v, std=None, n=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    s = f"{v:.2f}" if abs(v) < 1e4 else f"{v:.3g}"
    if n and n > 1 and std is not None and not math.isnan(std):
        s += f" ± {std:.2f} (n={n})"
    return s


def _pivot(long: pd.DataFrame, cell) -> pd.DataFrame:
    long = long[long["metric"].isin(PIVOT_METRICS)]
    firsts = long.drop_duplicates("label")
    labels = [lab for _, lab in sorted(zip(firsts["order"], firsts["label"]), key=lambda t: tuple(t[0]))]
    datasets = list(dict.fromkeys(long["dataset"]))
    models = list(dict.fromkeys(long["model"]))
    data = {}
    for lab in labels:
        sub = long[long["label"] == lab]
        bits = {m: sub[sub["model"] == m]["bits_reported"].dropna() for m in models} if "bits_reported" in sub else {}
        data[(lab, "bits")] = [_fmt(bits[m].iloc[0]) if m in bits and len(bits[m]) else "—" for m in models]
        for d in datasets:
            cells = []
            for m in models:
                hit = sub[(sub["model"] == m) & (sub["dataset"] == d)]
                cells.append(cell(hit.iloc[0]) if len(hit) else "")
            if any(cells):
                data[(lab, d)] = cells
    df = pd.DataFrame(data, index=models)
    df.columns = [f"{a} · {b}" for a, b in df.columns]
    df.index.name = "model"
    return df


def _windows_text(runs: pd.DataFrame) -> str:
    """The windows the numbers were computed over, from the results (never from the config alone)."""
    done = runs[runs["status"] == "complete"]
    parts, mixed = [], []
    for c in [c for c in done.columns if c.startswith("windows:")]:
        w = sorted({int(v) for v in pd.to_numeric(done[c], errors="coerce").dropna()})
        if w:
            parts.append(f"{c.split(':', 1)[1]} {'/'.join(map(str, w))}")
            if len(w) > 1:
                mixed.append(c.split(":", 1)[1])
    text = "windows per set: " + (", ".join(parts) if parts else "not recorded")
    if mixed:
        text += f" (**different window counts within this table for {', '.join(mixed)}**: see windows:<set> in the runs CSV)"
    return text


def _ref_cell(r) -> str:
    parts = []
    if r.get("paper_status") not in (None, "") and not pd.isna(r.get("paper_status")):
        parts.append("paper " + ("missing" if r["paper_status"] == "missing"
                                 else f"{_fmt(r['paper_value'])} ({r['paper_status']})"))
    if r.get("lit_value") is not None and not pd.isna(r.get("lit_value")):
        star = "" if r["lit_status"] == "verified" else "?"
        parts.append(f"lit {_fmt(r['lit_value'])}{star} [{r['lit_protocol']}, {r['lit_bits_label']}b]")
    return "; ".join(parts)


def experiments_of(table: str) -> list[str]:
    """The experiment configs whose jobs carry this tag (e.g. main_cpu_jitter adds replicates to main_cpu)."""
    exp_dir = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    found = [p.stem for p in sorted(exp_dir.glob("*.yaml")) if p.stem != table
             and any(line.strip() == f"tag: {table}" for line in p.read_text().splitlines())]
    return ([table] if (exp_dir / f"{table}.yaml").exists() else []) + found


def markdown(table: str, long: pd.DataFrame, runs: pd.DataFrame, pairs: pd.DataFrame | None = None,
             summary: pd.DataFrame | None = None, front: pd.DataFrame | None = None, name: str | None = None,
             source: str | Path | None = None) -> str:
    cmds = [f"`python -m experiments.run -m experiment={e}`" for e in experiments_of(table)]
    lines = [f"# {name or table}" + (f" (jobs of `{table}`)" if name and name != table else ""), ""]
    if cmds:
        lines += [f"Produced by {' and '.join(cmds)} then `python -m experiments.report`.", ""]
    if name and name != table:
        lines += [f"The jobs of `{table}` under `{source}` (e.g. the same sweep on another machine), beside the "
                  f"table itself (`{table}.md`): `python -m experiments.report --outputs {source} --name {name}`.", ""]
    reused = runs[runs["reused_from"].notna()] if "reused_from" in runs else runs.iloc[:0]
    if len(reused):
        lines += [f"{len(reused)} of {len(runs)} jobs are copies of the same configuration complete under another tag "
                  f"({', '.join(sorted(set(reused['reused_from'])))}; `reused_from` in the runs CSV; same CPU, threads "
                  "and torch build, oac/jobdir/reuse.py): their numbers and times are that job's.", ""]
    failed = runs[runs["status"] != "complete"]
    if len(failed):
        lines += [f"{len(failed)} job(s) not complete:", ""]
        for _, r in failed.iterrows():
            ov = r.get("overrides") if isinstance(r.get("overrides"), str) and r.get("overrides") else None
            err = r.get("error") if isinstance(r.get("error"), str) else None
            lines.append(f"- {r['model']}/{r['method']} **{r['status']}**" + (f" — `{ov}`" if ov else "")
                         + (f": {err}" if err else "") + (f" ({r['job_dir']})" if r.get("job_dir") else ""))
        lines.append("")
    if long.empty:
        return "\n".join(lines + ["No complete results yet.", ""])
    first = long.iloc[0]
    lines += [f"Calibration {first['calib_nsamples']} x {first['calib_seqlen']} ({first['calib_dataset']}); "
              f"perplexity at seqlen {first['eval_seqlen']}, " + _windows_text(runs)
              + "; zero-shot in %. `bits` = bits_reported (the method paper's convention, PROTOCOLS.md §4); "
              "bits_full is in the CSV. Mean ± std over calibration seeds when n > 1.", ""]
    ours = _pivot(long, lambda r: _fmt(r["value"], r["std"], r["n"]))
    lines += ["## Ours", "", ours.to_markdown(disable_numparse=True), ""]
    lines += missing_markdown(summary if summary is not None else pd.DataFrame())
    lines += quality_markdown(summary if summary is not None else pd.DataFrame(), runs)
    lines += paired_markdown(pairs if pairs is not None else pd.DataFrame())
    lines += band_markdown(summary if summary is not None else pd.DataFrame())
    if front is not None and not front.empty:
        lines += frontier_markdown(front) + [f"Plot: `{name or table}_frontier.png` (quality against Hessian-phase time, "
                                             "error bars = std over seeds; experiments/frontier.py).", ""]
    lines += summary_markdown(summary if summary is not None else pd.DataFrame(), runs)
    refs = _pivot(long, _ref_cell)
    if (refs.drop(columns=[c for c in refs.columns if c.endswith("· bits")]) != "").any().any():
        lines += ["## Reference cells (results/paper/*.csv)", "",
                  "`paper` = OAC paper cell (missing unless known, PAPER.md §5); `lit` = literature baseline "
                  "(`?` unverified) with its protocol and printed bits. Compare only where `comparable` is true in "
                  "the CSV.", "", refs.drop(columns=[c for c in refs.columns if c.endswith("· bits")]).to_markdown(
                      disable_numparse=True),
                  ""]
    else:
        lines += ["No reference cells exist for these models (CPU-scale results test the paper's qualitative "
                  "claims only, PAPER.md §7).", ""]
    return "\n".join(lines)


def report(outputs: str | Path = "outputs", results: str | Path = "results", *,
           include_untagged: bool = False, name: str | None = None) -> dict[str, Path]:
    """Write the tables; jobs without a ``tag`` (not from an experiment sweep) only with ``include_untagged``.
    ``name``: write the one table under ``outputs`` as ``<results>/<name>.*`` instead of ``<tag>.*`` (the same
    sweep measured on another machine, e.g. ``results/raw/oac_frontier_cpu_amd``)."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    found = [(d, r) for d, r in find_results(outputs) if include_untagged or r.get("tag")]
    if not found:
        log.warning("no %s under %s", RESULT_FILE, outputs)
        return {}
    runs = pd.DataFrame([result_row(r, d) for d, r in found])
    configs = {}
    for _, r in found:
        if r.get("config"):
            configs[group_key(r["config"])] = r["config"]
    refs = load_refs(results / "paper")
    if name is not None and runs["table"].nunique() != 1:
        raise SystemExit(f"--name {name}: {outputs} holds the tables {sorted(set(runs['table']))}; name one")
    written = {}
    for table, sub in runs.groupby("table", sort=True):
        stem = name or table
        long = join_refs(aggregate(sub, configs), refs)
        labels = dict(zip(long["group"], long["label"])) if not long.empty else {}
        sub = sub.assign(label=[labels.get(g) or _label(r) for g, (_, r) in zip(sub["group"], sub.iterrows())])
        summary, pairs = seed_summary(sub), paired(sub)
        front = frontier(sub, summary, pairs)
        sub.to_csv(results / f"{stem}_runs.csv", index=False)
        long.to_csv(results / f"{stem}.csv", index=False)
        summary.to_csv(results / f"{stem}_seeds.csv", index=False)
        if not pairs.empty:
            pairs.to_csv(results / f"{stem}_paired.csv", index=False)
        if not front.empty:
            front.to_csv(results / f"{stem}_frontier.csv", index=False)
            import matplotlib.pyplot as plt

            plt.close(plot_frontier(front, results / f"{stem}_frontier.png"))
        (results / f"{stem}.md").write_text(markdown(table, long, sub, pairs, summary, front, name=stem,
                                                             source=outputs))
        written[stem] = results / f"{stem}.md"
        log.info("%s: %d jobs (%d complete) -> %s", stem, len(sub), int((sub["status"] == "complete").sum()),
                 written[stem])
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", default="outputs", help="root searched for result.json (recursively)")
    ap.add_argument("--results", default="results", help="where <table>.csv/.md go (reads <results>/paper/*.csv)")
    ap.add_argument("--name", default=None, help="write the one table under --outputs as <name>.* (not <tag>.*)")
    ap.add_argument("--include-untagged", action="store_true", help="also jobs without a tag (table 'adhoc')")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    report(args.outputs, args.results, include_untagged=args.include_untagged, name=args.name)


if __name__ == "__main__":
    main()
