"""Experiment loggers: ``logger=none`` (default) or ``logger=wandb`` (configs/logger/wandb.yaml).

W&B gets, per job: the resolved config, the perplexities / zero-shot accuracies / bits / timings as
summary metrics, one step per quantized block (mean per-layer statistics of that block), the per-layer
statistics as a table, and the flat result row that ``experiments/report.py`` builds. A logging
failure never fails the job (it is logged as a warning).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def log_job(cfg: DictConfig, result: dict, out_dir) -> None:
    lcfg = cfg.get("logger") or {}
    name = lcfg.get("name", "none")
    if name in (None, "none"):
        return
    if name != "wandb":
        log.warning("unknown logger %r: nothing logged", name)
        return
    try:
        log_wandb(lcfg, cfg, result, out_dir)
    except Exception as e:  # never lose a finished job to its logger
        log.warning("W&B logging failed: %s: %s", type(e).__name__, e)


def block_stats(layers: list[dict]) -> list[dict]:
    """Mean of every numeric per-layer statistic, per block, in block order."""
    acc: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in layers:
        for k, v in r.items():
            if k not in ("block", "shape") and isinstance(v, (int, float)) and not isinstance(v, bool):
                acc[r["block"]][k].append(v)
    return [{"block": b, **{k: sum(v) / len(v) for k, v in d.items()}} for b, d in sorted(acc.items())]


def summary_metrics(row: dict) -> dict:
    """Numeric fields of the report row (``ppl:<dataset>``, ``zs:<task>``, bits) as W&B summary keys."""
    out = {k.replace(":", "/"): v for k, v in row.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
    out["status"] = row.get("status")
    return out


def log_wandb(lcfg, cfg: DictConfig, result: dict, out_dir) -> None:
    import wandb

    from oac.rows import result_row

    mode = os.environ.get("WANDB_MODE") or lcfg.get("mode", "offline")
    run = wandb.init(project=lcfg.get("project", "oac-repro"), entity=lcfg.get("entity"), mode=mode,
                     dir=str(out_dir), name=lcfg.get("run_name") or f"{result['model']}/{result['method']}",
                     group=lcfg.get("group"), tags=list(lcfg.get("tags") or []),
                     config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
                     settings=wandb.Settings(console="off", x_disable_stats=True, x_save_requirements=False))
    try:
        for rec in block_stats(result.get("layers") or []):
            run.log({f"block/{k}": v for k, v in rec.items()}, step=rec["block"])
        layers = result.get("layers") or []
        if layers:
            cols = sorted({k for r in layers for k in r if k != "shape"})
            run.log({"layers": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in layers])})
        row = result_row(result, out_dir)
        run.summary.update(summary_metrics(row))
        run.summary.update({f"time_s/{k}": v for k, v in (result.get("time_s") or {}).items()})
        run.log({"result_row": wandb.Table(columns=list(row), data=[list(row.values())])})
    finally:
        run.finish()
