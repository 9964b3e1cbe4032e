"""One job: load a model, calibrate and quantize it, evaluate it, write result.json.

    validate (typed method, data files: no model)  →  load  →  check shapes  →  quantize block by block
    →  evaluate  →  result.json (status running → complete | failed)

``experiments/run.py`` is the thin Hydra entry point around :func:`run_job`.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time

import torch
from omegaconf import DictConfig, OmegaConf

from oac import method as methods
from oac.data.text import check_available
from oac.data.tokens import (CALIB_DATASETS, PPL_DATASETS, calibration_windows, eval_set, eval_source, eval_stream,
                             ids_checksum, text_stream)
from oac.environment import environment
from oac.errors import ConfigError
from oac.eval.perplexity import eval_windows, perplexity
from oac.jobdir import JobDir
from oac.jobdir.export import check_save_format
from oac.jobdir.record import versions
from oac.models import Adapter, family_of, load_model, model_fingerprint
from oac.pipeline import aggregate_bits, quantize_model

log = logging.getLogger(__name__)


class ResultError(RuntimeError):
    """A job produced a number that cannot be reported (NaN/Inf): the job fails instead of completing."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available")
    return name


def _verify(cfg: DictConfig) -> bool:
    """paths.verify_data: check local data files against SHA256SUMS (default true)."""
    return bool(cfg.paths.get("verify_data", True))


def validate(cfg: DictConfig) -> methods.Method:
    """Every check that needs no model, in milliseconds: the typed method (solver settings, Hessian-source
    options and their combination), calibration and evaluation data. Returns the resolved method."""
    m = methods.resolve(cfg.method)
    check_save_format(cfg, m)  # save_format=compressed-tensors: uniform-grid solvers only
    if m.calibrated:
        if cfg.calib.dataset not in CALIB_DATASETS:
            raise ConfigError(f"unknown calibration dataset {cfg.calib.dataset!r}; known: {sorted(CALIB_DATASETS)}")
        if isinstance(cfg.calib.nsamples, bool) or not isinstance(cfg.calib.nsamples, int) or cfg.calib.nsamples < 1:
            raise ConfigError(f"calib.nsamples must be an integer >= 1, got {cfg.calib.nsamples!r}")
        if isinstance(cfg.calib.seqlen, bool) or not isinstance(cfg.calib.seqlen, int) or cfg.calib.seqlen < 2:
            raise ConfigError(f"calib.seqlen must be an integer >= 2, got {cfg.calib.seqlen!r}")
        check_available(CALIB_DATASETS[cfg.calib.dataset], cfg.paths.data_dir, verify=_verify(cfg))
    for key, src in eval_sets(cfg).items():
        if src in PPL_DATASETS:
            check_available(eval_source(src), cfg.paths.data_dir, verify=_verify(cfg))
    _check_budget(cfg.eval.ppl)
    kcfg = cfg.eval.get("kl") or {}
    if kcfg.get("datasets"):
        if kcfg.get("reference", "full") not in ("full", "topk"):
            raise ConfigError(f"eval.kl.reference must be full or topk, not {kcfg.get('reference')!r}")
        k = kcfg.get("topk", 64)
        if kcfg.get("reference") == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"eval.kl.topk must be an integer >= 1, got {k!r}")
    js = cfg.get("jitter_seed")
    if js is not None:
        if isinstance(js, bool) or not isinstance(js, int):
            raise ConfigError(f"jitter_seed must be an integer or null, got {js!r}")
        if not m.calibrated:
            raise ConfigError(f"jitter_seed perturbs the Hessian, and method {m.name!r} uses none")
    if cfg.eval.zeroshot.tasks:
        from oac.eval import zeroshot

        zeroshot.resolve_modes(zeroshot.resolve_tasks(list(cfg.eval.zeroshot.tasks)), cfg.eval.zeroshot.mode,
                               cfg.paths.data_dir)
    return m


def eval_sets(cfg: DictConfig) -> dict[str, str]:
    """{key: source} of every evaluation set: ``eval.ppl.datasets`` then the ``eval.kl.datasets`` not among them
    (perplexity comes free with the KL pass). Keys are the built-in names or the stems of local text files."""
    out: dict[str, str] = {}
    kl = list((cfg.eval.get("kl") or {}).get("datasets") or [])
    for entry in [*cfg.eval.ppl.datasets, *kl]:
        key, src = eval_set(entry)
        if key in out and out[key] != src:
            raise ConfigError(f"two evaluation sets are both called {key!r} ({out[key]}, {src}); name one: 'name=path'")
        out[key] = src
    return out


def kl_sets(cfg: DictConfig) -> list[str]:
    """Keys of the sets on which KL to the unquantized model is measured."""
    return [eval_set(e)[0] for e in ((cfg.eval.get("kl") or {}).get("datasets") or [])]


def _check_budget(pcfg) -> None:
    for key in ("max_windows", "max_tokens"):
        v = pcfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"eval.ppl.{key} must be an integer >= 1 or null, got {v!r}")
    if pcfg.get("max_tokens") is not None and pcfg.max_tokens < pcfg.seqlen:
        raise ConfigError(f"eval.ppl.max_tokens={pcfg.max_tokens} is less than one window (seqlen {pcfg.seqlen})")


def validate_model(cfg: DictConfig, adapter: Adapter, m: methods.Method) -> None:
    """Checks that need the loaded model (before any calibration work): layer shapes the solver cannot handle,
    non-finite weights (every method, fp16 and eval-only jobs too), calibration windows within the context."""
    ctx = getattr(adapter.model.config, "max_position_embeddings", None)
    if m.calibrated and ctx and cfg.calib.seqlen > ctx:
        raise ConfigError(f"calib.seqlen={cfg.calib.seqlen} exceeds the model's context ({ctx} tokens)")
    for k, block in enumerate(adapter.blocks):
        for name, lin in adapter.linears(block).items():
            d_out, d_in = lin.weight.shape
            try:
                m.check_shape(d_out, d_in)
            except ConfigError as e:
                raise ConfigError(f"block {k} {name} ({d_out}x{d_in}): {e}") from None
            if not torch.isfinite(lin.weight).all():
                raise ConfigError(f"block {k} {name}: weight contains NaN/Inf; refusing to quantize or evaluate")


def peak_mem_gb(device: str) -> dict:
    out = {"cpu_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.startswith("cuda"):
        out["cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def run_job(cfg: DictConfig, out_dir: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Run one job and write ``out_dir/result.json``. Raises on failure (after writing a failed record).
    ``overrides``: the command-line overrides that made ``cfg`` (recorded, to name the job in summaries)."""
    if cfg.get("quantized_from"):  # eval-only: model, method, calib of the saved job
        from oac.jobdir.saved import with_saved_config

        cfg = with_saved_config(cfg)
    m = validate(cfg)  # before anything is written or loaded
    job = JobDir(out_dir, cfg)
    if cfg.get("skip_complete", True) and (done := job.completed()) is not None:
        log.info("skipped: complete (%s)", out_dir)
        return {**done, "skipped": True}
    if cfg.get("reuse_results", True) and cfg.get("skip_complete", True) and \
            (done := job.reuse([cfg.paths.output_dir, *(cfg.get("reuse_roots") or [])], overrides)) is not None:
        log.info("reused: the same configuration up to tag, complete in %s (reuse_results=false recomputes)",
                 done["reused_from"]["job_dir"])
        return {**done, "skipped": True}
    t_start = time.perf_counter()
    result = {"status": "running", "model": cfg.model.name, "method": m.name,
              "wbits": cfg.method.get("wbits"), "groupsize": cfg.method.get("groupsize"), "tag": cfg.get("tag"),
              "config": OmegaConf.to_container(cfg, resolve=True), "config_hash": job.hash,
              "overrides": list(overrides or []), "versions": versions(), "ppl": {}, "zeroshot": {}, "time_s": {}}
    job.begin(result)  # lock (or JobLocked) + status running
    ok = False
    try:
        _run(cfg, m, result, job)
        check_finite_result(result)
        result["status"] = "complete"
        ok = True
    except BaseException as e:
        result["status"] = "failed"
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        raise
    finally:
        result["time_s"]["total"] = time.perf_counter() - t_start
        result["peak_mem_gb"] = peak_mem_gb(result.get("device", "cpu"))
        try:
            job.write(result)
            from oac.logger import log_job

            log_job(cfg, result, out_dir)
        finally:
            job.end(keep_blocks=bool(cfg.get("save")), clear=ok)
    return result


def check_finite_result(result: dict) -> None:
    """A NaN/Inf metric is a failure, never a result."""
    bad = [f"{m}[{k}]" for m in ("ppl", "kl", "top1_agreement") for k, v in (result.get(m) or {}).items()
           if not math.isfinite(v)]
    for task, entry in ((result.get("zeroshot") or {}).get("tasks") or {}).items():
        bad += [f"zeroshot[{task}].{k}" for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ResultError(f"non-finite metric(s): {', '.join(bad)}")


def _run(cfg: DictConfig, m: methods.Method, result: dict, job: JobDir) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    result["device"] = device if device == "cpu" else f"{device}:{torch.cuda.get_device_name()}"
    result["environment"] = environment(device)
    if cfg.get("jitter_seed") is not None:
        result["jitter_seed"] = int(cfg.jitter_seed)
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
    refs = {}
    if cfg.get("quantized_from"):
        from oac.jobdir.saved import restore_into_job

        if kl_sets(cfg):
            refs = _kl_references(cfg, model, tok, device, result)  # the base model, before the saved weights
        restore_into_job(cfg, model, result)
        validate_model(cfg, adapter, methods.resolve({"name": m.name}))  # the saved weights must be finite too
    elif m.quantizes:
        validate_model(cfg, adapter, m)
        if kl_sets(cfg):
            refs = _kl_references(cfg, model, tok, device, result)  # FP pass before the weights change
        _quantize(cfg, m, adapter, tok, device, result, job)
    else:
        validate_model(cfg, adapter, m)
        result.update({"bits_nominal": 16.0, "bits_reported": 16.0, "bits_full": 16.0, "avg_bits": 16.0})
    if device != "cpu":
        model.to(device)
    _evaluate(cfg, model, tok, device, result, refs)


def _quantize(cfg: DictConfig, m: methods.Method, adapter, tok, device, result, job: JobDir) -> None:
    result["solver_config"] = vars(m.solver_config)
    source = m.build_source()
    calib = None
    if m.calibrated:
        calib = calibration_windows(tok, cfg.calib, data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir,
                                    verify=_verify(cfg))
        result["calibration"] = {**OmegaConf.to_container(cfg.calib, resolve=True), "checksum": ids_checksum(calib),
                                 "n_tokens": calib.numel()}
    t = time.perf_counter()
    ckpt = job.block_writer(adapter, calibrated=m.calibrated, source=source,
                            calib_checksum=(result.get("calibration") or {}).get("checksum"))
    solve = ckpt.wrap(m.solver.solve) if ckpt else m.solver.solve
    state = quantize_model(adapter, calib, source, solve, m.solver_config, device=device,
                           true_sequential=m.true_sequential, offload=cfg.offload, batch_size=cfg.calib_batch_size,
                           act_device=cfg.get("act_device"), on_block_done=ckpt.on_block_done if ckpt else None,
                           resume=ckpt.resume() if ckpt else None, jitter_seed=cfg.get("jitter_seed"))
    result["resumed_from_block"] = state.start_block or None
    result["hessian"] = source.record()
    result["time_s"].update({f"calib_{k}": v for k, v in state.time_s.items()})
    result["time_s"]["quantize"] = time.perf_counter() - t
    layers = state.layers
    result["layers"] = layers
    bits = aggregate_bits(layers)
    result.update(bits)
    result["avg_bits"] = bits.get("bits_full")
    damp = [r["percdamp_used"] for r in layers if "percdamp_used" in r]
    if damp:
        result["damping"] = {"max_percdamp_used": max(damp),
                             "layers_with_retries": sum(1 for r in layers if r.get("damp_retries", 0) > 0)}
    if cfg.get("save"):
        job.save_manifest(result, adapter.model, tok)


def _eval_ids(cfg, tok, src: str) -> tuple[torch.Tensor, dict]:
    """Token stream of one evaluation set and what identifies its source."""
    if src in PPL_DATASETS:
        ids = eval_stream(tok, src, cfg.eval.ppl.seqlen, data_dir=cfg.paths.data_dir, cache_dir=cfg.paths.cache_dir,
                          verify=_verify(cfg))
        return ids, {"source": src}
    ids, digest = text_stream(tok, src, cache_dir=cfg.paths.cache_dir)
    return ids, {"source": os.path.abspath(src), "sha256": digest}


def _kl_references(cfg, model, tok, device, result) -> dict:
    """The FP model's reference distribution on every KL set (computed once, cached): {key: reference info}."""
    from oac.eval.kl import ensure_reference

    pcfg, kcfg = cfg.eval.ppl, cfg.eval.kl
    sets = eval_sets(cfg)
    moved = cfg.offload and device != "cpu"
    if moved:
        model.to(device)
    refs = {}
    t = time.perf_counter()
    try:
        for key in kl_sets(cfg):
            ids, _ = _eval_ids(cfg, tok, sets[key])
            windows, _ = eval_windows(ids, pcfg.seqlen, max_windows=pcfg.max_windows, max_tokens=pcfg.get("max_tokens"))
            path = str(model.name_or_path)
            ref_key = {"model": os.path.abspath(path) if os.path.exists(path) else path,
                       "fingerprint": model_fingerprint(model),
                       "dtype": str(model.dtype), "device": str(device).split(":")[0], "seqlen": pcfg.seqlen,
                       "windows": ids_checksum(windows), "n_windows": windows.shape[0], "mode": kcfg.reference,
                       "topk": int(kcfg.topk) if kcfg.reference == "topk" else None, "v": 1}
            refs[key] = ensure_reference(model, windows, cache_dir=cfg.paths.cache_dir, key=ref_key,
                                         batch_size=pcfg.batch_size, device=device, desc=f"kl reference {key}")
    finally:
        if moved:
            model.to("cpu")
    result["kl_reference"] = {k: {x: v[x] for x in ("path", "mode", "topk", "cached", "time_s", "bytes", "ppl_fp")
                                  if x in v} for k, v in refs.items()}
    result["time_s"]["kl_reference"] = time.perf_counter() - t
    return refs


def _evaluate(cfg, model, tok, device, result, refs: dict | None = None) -> None:
    from oac.eval.kl import KLAccumulator

    t = time.perf_counter()
    pcfg = cfg.eval.ppl
    refs = refs or {}
    for name, src in eval_sets(cfg).items():
        ids, origin = _eval_ids(cfg, tok, src)
        acc = None
        if name in refs:
            windows, _ = eval_windows(ids, pcfg.seqlen, max_windows=pcfg.max_windows, max_tokens=pcfg.get("max_tokens"))
            acc = KLAccumulator(refs[name], windows.shape[0], pcfg.seqlen)
        r = perplexity(model, ids, pcfg.seqlen, batch_size=pcfg.batch_size, max_windows=pcfg.max_windows,
                       max_tokens=pcfg.get("max_tokens"), device=device, desc=f"ppl {name}", on_logits=acc)
        label = f"{name}@local2k" if src in ("c4", "c4-new") else name
        r.update({"variant": label, **origin})
        result["ppl"][name] = r["ppl"]
        result.setdefault("ppl_details", {})[name] = r
        msg = ""
        if acc is not None:
            k = acc.result()
            result.setdefault("kl", {})[name] = k["kl"]
            result.setdefault("top1_agreement", {})[name] = k["top1_agreement"]
            result.setdefault("kl_details", {})[name] = {
                **k, "n_windows": r["n_windows"], "seqlen": pcfg.seqlen, "reference": refs[name]["mode"],
                "topk": refs[name].get("topk"), "exact": refs[name]["mode"] == "full"}
            msg = f", KL {k['kl']:.4f} nats/token, top-1 agreement {100 * k['top1_agreement']:.2f}%"
        log.info("%s %s %s: ppl %.4f (%d windows x %d)%s", cfg.model.name, cfg.method.name, name, r["ppl"],
                 r["n_windows"], pcfg.seqlen, msg)
        exp = (cfg.model.get("expected_ppl") or {}).get(name)
        if exp and src == name and not cfg.method.get("solver") and r["complete"] and pcfg.seqlen == cfg.model.seqlen:
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


