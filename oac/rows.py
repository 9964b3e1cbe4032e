"""One flat row per job (``result.json`` -> dict): shared by the report, the W&B logger and notebooks."""

from __future__ import annotations

import json
from pathlib import Path

from oac import hessian, solvers
from oac.environment import summary as environment_summary
from oac.jobdir import config_hash, job_state
from oac.method import source_keys

BITS = ["bits_nominal", "bits_reported", "bits_full", "avg_bits", "outlier_fraction", "salient_fraction"]


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def result_row(result: dict, job_dir: str | Path | None = None) -> dict:
    """One flat row per job: identity, settings, bits, metrics (``ppl:<dataset>``, ``zs:<task>`` in %)."""
    cfg = result.get("config") or {}
    method = result.get("method")
    row = {
        "table": result.get("tag") or "adhoc",
        "model": result.get("model"),
        "method": method,
        "backbone": _get(cfg, "method.backbone") or _get(cfg, "method.solver") or method,
        "wbits": result.get("wbits"),
        "groupsize": result.get("groupsize"),
        "calib_dataset": _get(cfg, "calib.dataset"),
        "calib_nsamples": _get(cfg, "calib.nsamples"),
        "calib_seqlen": _get(cfg, "calib.seqlen"),
        "calib_seed": _get(cfg, "calib.seed"),
        "jitter_seed": _get(cfg, "jitter_seed"),
        "eval_seqlen": _get(cfg, "eval.ppl.seqlen"),
        "max_windows": _get(cfg, "eval.ppl.max_windows"),
        "device": str(result.get("device", "")).split(":")[0],
        "status": job_state(result, job_dir) if job_dir is not None else result.get("status"),
        "error": result.get("error"),
    }
    row.update({k: result.get(k) for k in BITS})
    row.update({f"ppl:{k}": v for k, v in (result.get("ppl") or {}).items()})
    row.update({f"kl:{k}": v for k, v in (result.get("kl") or {}).items()})  # nats per token vs the FP model
    row.update({f"top1:{k}": None if v is None else 100 * v for k, v in (result.get("top1_agreement") or {}).items()})
    # windows each number was computed over (ppl and KL share them)
    row.update({f"windows:{k}": d.get("n_windows") for k, d in (result.get("ppl_details") or {}).items()})
    zs = result.get("zeroshot") or {}
    for task, entry in (zs.get("tasks") or {}).items():
        v = entry.get(entry.get("metric_for_avg", "acc"))
        row[f"zs:{task}"] = None if v is None else 100 * v
    if (zs.get("average") or {}).get("value") is not None:
        row["zs:average"] = 100 * zs["average"]["value"]
    times = result.get("time_s") or {}
    row.update({"time_total_s": times.get("total"), "time_quantize_s": times.get("quantize"),
                "time_hessian_s": times.get("calib_hessian")})
    # cost of the Hessian phase beyond its time: block forward+backward passes computed (cache hits add none),
    # the fp32 Hessians held at once in one pass, and the job's peak resident memory
    row["hessian_block_passes"] = _get(result, "hessian.stats.block_passes")
    pass_bytes = _get(result, "hessian.memory.pass_peak_bytes")
    row["hessian_pass_gb"] = None if pass_bytes is None else pass_bytes / 1e9
    row["peak_rss_gb"] = _get(result, "peak_mem_gb.cpu_rss_gb")
    row["peak_cuda_gb"] = _get(result, "peak_mem_gb.cuda_gb")
    row["refresh"] = refresh_of(result)
    # Ĥ reloaded from oac_cache_dir for this many blocks (passes): the Hessian time is then not its cost
    row["hessian_cache_hits"] = _get(result, "hessian.stats.cache_hits")
    row["hessian_cache_misses"] = _get(result, "hessian.stats.cache_misses")
    row["hessian_cost_s"], row["hessian_cost_passes"], row["hessian_cost_exact"] = hessian_cost(result)
    row["config_hash"] = result.get("config_hash") or (config_hash(cfg) if cfg else None)
    row["group"] = group_key(cfg) if cfg else row["config_hash"]
    row["pair"] = pair_key(cfg) if cfg else row["config_hash"]
    row["family"] = family_key(cfg) if cfg else row["config_hash"]
    row["solver"] = _get(cfg, "method.solver")
    row["hessian"] = _get(cfg, "method.hessian")
    row["calibrated"] = hessian.is_calibrated(row["hessian"])
    row["variant"] = hessian.is_variant(row["hessian"])  # paired with its layer-wise backbone in the report
    row["order"] = method_order(row["solver"], row["hessian"])
    row["overrides"] = overrides_of(result)
    row["replicate"] = replicate_id(row["calib_seed"], row["jitter_seed"])
    env = result.get("environment") or {}
    row["threads"] = env.get("threads")
    row["environment"] = environment_summary(env)
    # copied from the same configuration complete under another tag (oac/jobdir/reuse.py): that table's job
    row["reused_from"] = (result.get("reused_from") or {}).get("tag")
    row["job_dir"] = str(job_dir) if job_dir is not None else None
    return row


def replicate_id(seed, jitter) -> str | None:
    """A replicate of a configuration: its calibration seed, and its numeric jitter when set (``0``, ``0/j1``)."""
    def val(v):
        return None if v is None or (isinstance(v, float) and v != v) else int(v)

    s, j = val(seed), val(jitter)
    if s is None and j is None:
        return None
    return f"{s}" + (f"/j{j}" if j is not None else "")


def refresh_of(result: dict) -> str | None:
    """How often an end-loss source recomputed its Hessians: ``per_block``, ``every<r>``, ``once`` (None: no refresh)."""
    h = result.get("hessian") or {}
    refresh = h.get("refresh")
    if refresh == "every":
        return f"every{h.get('refresh_every')}"
    return refresh


def group_key(cfg: dict) -> str:
    """Identity of a configuration up to its replicates: the calibration seed and the numeric jitter."""
    cfg = json.loads(json.dumps(cfg))
    cfg.get("calib", {}).pop("seed", None)
    cfg.pop("jitter_seed", None)
    return config_hash(cfg)


def method_order(solver: str | None, source: str | None) -> tuple[int, int]:
    """Table order of a method: by solver (RTN, GPTQ, SpQR, BiLLM, ...), then by Hessian source; fp16 first."""
    try:
        s = solvers.get(solver).order if solver else 0
    except Exception:
        s = 1000
    try:
        h = hessian.get(source).order
    except Exception:
        h = 1000
    return (s, h)


def overrides_of(result: dict) -> str | None:
    """The job's command-line overrides (``result.json`` ``overrides``), naming it in failure summaries."""
    ov = result.get("overrides")
    return " ".join(ov) if isinstance(ov, list) else ov


def pair_key(cfg: dict) -> str:
    """Identity up to the calibration seed and the Hessian source: OAC-X and X with the same solver settings,
    model, calibration and evaluation share it (``true_sequential`` is dropped: it does not apply to OAC).
    The source's keys come from the registry (``oac.method.source_keys``)."""
    cfg = json.loads(json.dumps(cfg))
    cfg.get("calib", {}).pop("seed", None)
    cfg.pop("jitter_seed", None)
    cfg.pop("tag", None)
    method = cfg.get("method") or {}
    for k in source_keys():
        method.pop(k, None)
    return config_hash(cfg)


def family_key(cfg: dict) -> str:
    """Identity up to the replicates and the Hessian source's refresh schedule: the points of one refresh
    frontier (OAC per_block, every r, once) share it (experiments/frontier.py)."""
    cfg = json.loads(json.dumps(cfg))
    cfg.get("calib", {}).pop("seed", None)
    cfg.pop("jitter_seed", None)
    cfg.pop("tag", None)
    method = cfg.get("method") or {}
    for k in hessian.option_keys():
        if isinstance(method.get(k), dict):
            method[k].pop("refresh", None)
            method[k].pop("refresh_every", None)
    return config_hash(cfg)


def hessian_cost(result: dict) -> tuple[float | None, float | None, bool]:
    """What this job's Hessians cost to compute: (seconds, block forward+backward passes, exact).

    The Hessian phase's time and passes, plus, for Ĥ reloaded from the cache, what computing them cost
    (``hessian.stats.cached_*``, recorded with the cache entry). Where a reloaded entry's cost was not recorded
    (entries from before costs were kept) the job's own figures are returned as a lower bound, exact = False:
    a reload is never passed off as the cost of its Hessians.
    """
    t = (result.get("time_s") or {}).get("calib_hessian")
    stats = _get(result, "hessian.stats") or {}
    passes = stats.get("block_passes")
    if not stats.get("cache_hits") or t is None or passes is None:
        return t, passes, True
    t, passes = t + stats.get("cached_time_s", 0.0), passes + stats.get("cached_block_passes", 0)
    return t, passes, not stats.get("cached_cost_unknown", 1)
