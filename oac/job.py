"""One job: load a model, calibrate and quantize it, evaluate it, write result.json.

``experiments/run.py`` is the thin Hydra entry point around :func:`run_job`.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from oac import solvers
from oac.data.text import check_available
from oac.data.tokens import CALIB_DATASETS, PPL_DATASETS, calibration_windows, eval_source, eval_stream, ids_checksum
from oac.errors import ConfigError
from oac.eval.perplexity import perplexity
from oac.models import Adapter, family_of, load_model, model_fingerprint
from oac.pipeline import aggregate_bits, quantize_model
from oac.resume import clear_checkpoint, completed_result, config_hash, make_checkpoint
from oac.results import RESULT_FILE, write_json_atomic, versions

log = logging.getLogger(__name__)

SUPPORTED_WBITS = {"rtn": range(1, 9), "gptq": range(1, 9), "spqr": range(1, 9)}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available")
    return name


def make_hessian_source(method: DictConfig):
    kind = method.get("hessian")
    if kind == "layerwise":
        from oac.hessian.layerwise import LayerwiseHessian

        return LayerwiseHessian()
    if kind == "output_adaptive":
        from oac.hessian.output_adaptive import OutputAdaptiveHessian

        return OutputAdaptiveHessian(**OmegaConf.to_container(method.get("oac") or {}, resolve=True))
    raise ConfigError(f"method {method.name!r}: unknown hessian source {kind!r} (layerwise | output_adaptive | null)")


def validate(cfg: DictConfig) -> None:
    """Cheap checks that must fail in seconds, before any model or data is loaded."""
    m = cfg.method
    if m.get("solver"):
        scfg = solvers.make_config(m.solver, OmegaConf.to_container(m, resolve=True))
        wb = getattr(scfg, "wbits", None)
        if wb is not None and m.solver in SUPPORTED_WBITS and wb not in SUPPORTED_WBITS[m.solver]:
            raise ConfigError(f"method {m.name!r}: unsupported bit-width wbits={wb} (supported: 1..8)")
        if m.get("hessian"):
            make_hessian_source(m)  # validates the source and its options (cheap: no model work)
            if cfg.calib.dataset not in CALIB_DATASETS:
                raise ConfigError(f"unknown calibration dataset {cfg.calib.dataset!r}; known: {sorted(CALIB_DATASETS)}")
            check_available(CALIB_DATASETS[cfg.calib.dataset], cfg.paths.data_dir)
    for d in cfg.eval.ppl.datasets:
        if d not in PPL_DATASETS:
            raise ConfigError(f"unknown perplexity dataset {d!r}; known: {list(PPL_DATASETS)}")
        check_available(eval_source(d), cfg.paths.data_dir)
    if cfg.eval.zeroshot.tasks:
        from oac.eval import zeroshot

        zeroshot.resolve_modes(zeroshot.resolve_tasks(list(cfg.eval.zeroshot.tasks)), cfg.eval.zeroshot.mode,
                               cfg.paths.data_dir)


def validate_shapes(adapter: Adapter, scfg) -> None:
    """Group sizes must divide every quantized layer (checked on the loaded model, before calibration)."""
    for k, block in enumerate(adapter.blocks):
        for name, lin in adapter.linears(block).items():
            d_out, d_in = lin.weight.shape
            g = getattr(scfg, "groupsize", -1)
            if g not in (-1, 0, None) and d_in % g:
                raise ConfigError(f"groupsize={g} does not divide d_in={d_in} of block {k} {name} "
                                  f"(shape {d_out}x{d_in}); choose a divisor or -1 (per-channel)")
            qg = getattr(scfg, "qq_groupsize", None)
            if qg and getattr(scfg, "qq_scale_bits", None) is not None and d_out % qg:
                raise ConfigError(f"qq_groupsize={qg} does not divide d_out={d_out} of block {k} {name}")
            if not torch.isfinite(lin.weight).all():
                raise ConfigError(f"block {k} {name}: weight contains NaN/Inf; refusing to quantize")


def peak_mem_gb(device: str) -> dict:
    out = {"cpu_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.startswith("cuda"):
        out["cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def run_job(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run one job and write ``out_dir/result.json``. Raises on failure (after writing a failed record)."""
    out_dir = Path(out_dir)
    if cfg.get("quantized_from"):  # eval-only: model, method, calib of the saved job
        from oac.checkpoint import with_saved_config

        cfg = with_saved_config(cfg)
    if cfg.get("skip_complete", True) and (done := completed_result(cfg, out_dir)) is not None:
        log.info("skipped: complete (%s)", out_dir)
        return done
    t_start = time.perf_counter()
    result = {"status": "running", "model": cfg.model.name, "method": cfg.method.name,
              "wbits": cfg.method.get("wbits"), "groupsize": cfg.method.get("groupsize"), "tag": cfg.get("tag"),
              "config": OmegaConf.to_container(cfg, resolve=True), "config_hash": config_hash(cfg),
              "versions": versions(), "ppl": {}, "zeroshot": {}, "time_s": {}}
    try:
        _run(cfg, result, out_dir)
        result["status"] = "complete"
    except BaseException as e:
        result["status"] = "failed"
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        result["time_s"]["total"] = time.perf_counter() - t_start
        result["peak_mem_gb"] = peak_mem_gb(result.get("device", "cpu"))
        write_json_atomic(out_dir / RESULT_FILE, result)
        from oac.logger import log_job

        log_job(cfg, result, out_dir)
    clear_checkpoint(out_dir, keep_blocks=bool(cfg.get("save")))
    return result


def _run(cfg: DictConfig, result: dict, out_dir: Path | None = None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    validate(cfg)
    device = resolve_device(cfg.device)
    result["device"] = device if device == "cpu" else f"{device}:{torch.cuda.get_device_name()}"
    t = time.perf_counter()
    model, tok = load_model(cfg.model, cache_dir=cfg.paths.cache_dir, device=device, dtype=cfg.dtype)
    adapter = Adapter(model, family_of(model.config.model_type))
    if not cfg.offload or device == "cpu":
        model.to(device)
    result["time_s"]["load"] = time.perf_counter() - t
    result["model_info"] = {"path": model.name_or_path, "family": adapter.family, "n_blocks": len(adapter.blocks),
                            "dtype": str(model.dtype), "attn_implementation": model.config._attn_implementation,
                            "fingerprint": model_fingerprint(model), "n_quantized_weights": adapter.n_quantizable_weights()}
    result["tokenizer"] = {"class": type(tok).__name__, "add_bos_token": getattr(tok, "add_bos_token", None),
                           "vocab": len(tok)}
    method = cfg.method
    if cfg.get("quantized_from"):
        from oac.checkpoint import restore_into_job

        restore_into_job(cfg, model, result)
    elif method.get("solver"):
        _quantize(cfg, adapter, tok, device, result, out_dir)
    else:
        result.update({"bits_nominal": 16.0, "bits_reported": 16.0, "bits_full": 16.0, "avg_bits": 16.0})
    if device != "cpu":
        model.to(device)
    _evaluate(cfg, model, tok, device, result)


def _quantize(cfg, adapter, tok, device, result, out_dir: Path | None = None) -> None:
    method = cfg.method
    params = OmegaConf.to_container(method, resolve=True)
    scfg = solvers.make_config(method.solver, params)
    solve, _ = solvers.get_solver(method.solver)
    validate_shapes(adapter, scfg)
    result["solver_config"] = vars(scfg) if hasattr(scfg, "__dict__") else {}
    t = time.perf_counter()
    if not method.get("hessian"):  # RTN: no calibration, each layer independently
        writer = make_checkpoint(cfg, adapter, out_dir, calibrated=False)  # save=true: block files
        solve = writer.wrap(solve) if writer else solve
        layers = []
        for k, block in enumerate(adapter.blocks):
            for name, lin in adapter.linears(block).items():
                res = solve(lin.weight.data.float(), None, scfg)
                lin.weight.data = res.weight.to(lin.weight.dtype)
                rec = {"block": k, "name": name, "shape": list(lin.weight.shape)}
                rec.update({a: b for a, b in res.stats.items() if isinstance(b, (int, float, str, bool))})
                layers.append(rec)
            if writer:
                writer.write_block(k)
        result["time_s"]["solve"] = time.perf_counter() - t
    else:
        calib = calibration_windows(tok, cfg.calib, data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir)
        result["calibration"] = {**OmegaConf.to_container(cfg.calib, resolve=True), "checksum": ids_checksum(calib),
                                 "n_tokens": calib.numel()}
        source = make_hessian_source(method)
        ckpt = make_checkpoint(cfg, adapter, out_dir, calib_checksum=result["calibration"]["checksum"], source=source)
        state = quantize_model(adapter, calib, source, ckpt.wrap(solve) if ckpt else solve, scfg, device=device,
                               true_sequential=bool(method.get("true_sequential", False)), offload=cfg.offload,
                               batch_size=cfg.calib_batch_size, act_device=cfg.get("act_device"),
                               on_block_done=ckpt.on_block_done if ckpt else None,
                               resume=ckpt.resume() if ckpt else None)
        result["resumed_from_block"] = state.start_block or None
        layers = state.layers
        result["hessian"] = source.record()
        result["time_s"].update({f"calib_{k}": v for k, v in state.time_s.items()})
        result["time_s"]["quantize"] = time.perf_counter() - t
    result["layers"] = layers
    bits = aggregate_bits(layers)
    result.update(bits)
    result["avg_bits"] = bits.get("bits_full")
    damp = [r["percdamp_used"] for r in layers if "percdamp_used" in r]
    if damp:
        result["damping"] = {"max_percdamp_used": max(damp),
                             "layers_with_retries": sum(1 for r in layers if r.get("damp_retries", 0) > 0)}
    if cfg.get("save") and out_dir is not None:
        from oac.checkpoint import write_manifest

        write_manifest(out_dir, cfg, result, adapter.model)


def _evaluate(cfg, model, tok, device, result) -> None:
    t = time.perf_counter()
    pcfg = cfg.eval.ppl
    for name in pcfg.datasets:
        ids = eval_stream(tok, name, pcfg.seqlen, data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir)
        r = perplexity(model, ids, pcfg.seqlen, batch_size=pcfg.batch_size, max_windows=pcfg.max_windows,
                       device=device, desc=f"ppl {name}")
        label = name if name in ("wikitext2",) else f"{name}@local2k" if name.startswith("c4") else name
        r["variant"] = label
        result["ppl"][name] = r["ppl"]
        result.setdefault("ppl_details", {})[name] = r
        log.info("%s %s %s: ppl %.4f (%d windows x %d)", cfg.model.name, cfg.method.name, name, r["ppl"],
                 r["n_windows"], pcfg.seqlen)
        exp = (cfg.model.get("expected_ppl") or {}).get(name)
        if exp and not cfg.method.get("solver") and r["complete"] and pcfg.seqlen == cfg.model.seqlen:
            ok = abs(r["ppl"] - exp) / exp < 0.02
            result["fp_ppl_check"] = {"dataset": name, "expected": exp, "measured": r["ppl"], "ok": ok}
            if not ok:
                log.warning("FP perplexity %.3f differs from the expected %.3f: check the evaluation protocol",
                            r["ppl"], exp)
    result["time_s"]["eval_ppl"] = time.perf_counter() - t
    zcfg = cfg.eval.zeroshot
    if zcfg.tasks:
        from oac.eval.zeroshot import evaluate_zeroshot

        t = time.perf_counter()
        result["zeroshot"] = evaluate_zeroshot(
            model, tok, list(zcfg.tasks), data_dir=cfg.paths.data_dir, mode=zcfg.mode, num_fewshot=zcfg.num_fewshot,
            limit=zcfg.limit, batch_size=zcfg.batch_size, add_bos_token=zcfg.add_bos_token,
            max_length=zcfg.max_length or cfg.model.seqlen,
            work_dir=os.path.join(cfg.paths.cache_dir, "lm_eval"))
        result["time_s"]["eval_zeroshot"] = time.perf_counter() - t
    for v in result["ppl"].values():
        if not math.isfinite(v):
            log.warning("non-finite perplexity")
