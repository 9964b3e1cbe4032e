"""Quantized models others can load: the ``compressed-tensors`` export of uniform-grid methods (``<job>/compressed/``).

``save=true save_format=compressed-tensors`` (or ``python -m experiments.export <job>`` on a native save) writes a
Hugging Face folder in compressed-tensors' ``pack-quantized`` format, which ``AutoModelForCausalLM.from_pretrained``
loads (transformers' compressed-tensors quantizer; the weights are unpacked on the first forward pass) and vLLM
serves::

    config.json          the model config + ``quantization_config`` (one config group per stored grid shape)
    model.safetensors    per quantized linear: ``weight_packed`` (int32 words of codes), ``weight_scale`` (fp32),
                         ``weight_zero_point`` (packed, asymmetric grids), ``weight_shape``, ``weight_g_idx``
                         (act-order); everything else (embeddings, norms, lm_head) as in the model
    tokenizer files, generation_config.json
    recipe.yaml          the job: model, method, calibration, config_hash, bits

The codes, scales and zero points are the solver's own (``oac.quant.codes.layer_grid``: no refit). Every layer is
checked twice before it is written: the codes give back Ŵ bit for bit with the project's s·(q − z), and
compressed-tensors' own ``decompress`` of the packed tensors gives back Ŵ bit for bit. Scales are stored in fp32
whatever the model dtype: an fp16 Ŵ is the fp16 rounding of the fp32 product, which fp16 scales would not
reproduce.

Only solvers whose weights lie on a uniform per-channel/per-group grid can be exported (``SolverSpec.save_formats``:
RTN, GPTQ, with any Hessian source); SpQR (outliers, quantized statistics) and BiLLM (binary residuals) have no
standard format and keep the native save (``oac/jobdir/saved.py``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from oac.errors import ConfigError
from oac.io import write_json_atomic
from oac.quant.codes import GridError, LayerGrid, layer_grid

log = logging.getLogger(__name__)

NATIVE = "native"
COMPRESSED_TENSORS = "compressed-tensors"
SAVE_FORMATS = (NATIVE, COMPRESSED_TENSORS)
EXPORT_DIR = "compressed"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
CT_FORMAT = "pack-quantized"


# --- validation (no model) ---------------------------------------------------------------------------------------

def solver_formats(m) -> tuple[str, ...]:
    """The save formats of a resolved method's solver (native only for methods that do not quantize)."""
    return tuple(getattr(m.solver, "save_formats", (NATIVE,))) if m.solver is not None else (NATIVE,)


def check_format_supported(fmt: str, method_name: str, formats: tuple[str, ...]) -> None:
    if fmt not in SAVE_FORMATS:
        raise ConfigError(f"save_format must be one of {', '.join(SAVE_FORMATS)}; got {fmt!r}")
    if fmt not in formats:
        raise ConfigError(f"save_format={fmt}: method {method_name} has no {fmt} format; it supports "
                          f"save_format={' | '.join(formats)} (compressed-tensors: uniform-grid solvers, RTN and GPTQ)")


def check_save_format(cfg: DictConfig, m) -> str:
    """``save_format`` of a job config (one-line ConfigError, before any work). Returns the format."""
    fmt = cfg.get("save_format") or NATIVE
    if fmt not in SAVE_FORMATS:
        raise ConfigError(f"save_format must be one of {', '.join(SAVE_FORMATS)}; got {fmt!r}")
    if fmt == NATIVE:
        return fmt
    if cfg.get("quantized_from"):
        raise ConfigError(f"save_format={fmt}: an eval-only job (quantized_from) writes no model; convert the saved "
                          f"job with: python -m experiments.export <job_dir> --format {fmt}")
    if not m.quantizes:
        raise ConfigError(f"save_format={fmt}: method {m.name} does not quantize, there is nothing to export")
    check_format_supported(fmt, m.name, solver_formats(m))
    if m.row_groups > 1:  # one g_idx / one scale layout per layer cannot hold G separately solved row groups
        raise ConfigError(f"save_format={fmt}: method {m.name} solves {m.row_groups} row groups with their own "
                          "Hessians (hessian=guided, groups > 1); it supports save_format=native")
    if not cfg.get("save"):
        raise ConfigError(f"save_format={fmt} needs save=true")
    return fmt


# --- from a model + solver grids to a compressed-tensors folder ----------------------------------------------------

@contextlib.contextmanager
def _quiet_compressed_tensors():
    """compressed-tensors logs through loguru (e.g. a warning per act-order scheme); keep it out of job logs."""
    from loguru import logger

    logger.disable("compressed_tensors")
    try:
        yield
    finally:
        logger.enable("compressed_tensors")


def grids_from_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], method: dict) -> dict[str, LayerGrid]:
    """{module name: LayerGrid} of every linear with saved ``<name>.scale`` (the solver's side data)."""
    names = sorted({k.rsplit(".", 1)[0] for k in masks if k.endswith(".scale")})
    if not names:
        raise ConfigError("the saved model has no solver grids (<module>.scale): nothing to export")
    grids = {}
    for name in names:
        W = model.get_submodule(name).weight.detach().cpu()
        try:
            grids[name] = layer_grid(W, masks[f"{name}.scale"], masks[f"{name}.zero"], wbits=int(method["wbits"]),
                                     groupsize=int(method["groupsize"]), sym=bool(method.get("sym", False)),
                                     perm=masks.get(f"{name}.perm"),
                                     static_groups=bool(method.get("static_groups", False)), name=name)
        except GridError as e:
            raise ConfigError(str(e)) from None
    return grids


def _weight_args(grid: LayerGrid):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=grid.wbits, type="int", symmetric=grid.sym,
                            strategy="channel" if grid.group_size is None else "group",
                            group_size=grid.group_size, actorder="group" if grid.g_idx is not None else None,
                            scale_dtype=torch.float32)


def _scheme_key(grid: LayerGrid) -> tuple:
    return grid.wbits, grid.sym, grid.group_size, grid.g_idx is not None


def compress_layer(W: torch.Tensor, grid: LayerGrid, scheme, name: str = "layer") -> dict[str, torch.Tensor]:
    """compressed-tensors' packed tensors of one layer, checked to decompress to ``W`` bit for bit."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as Packed
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    offset = 1 << (grid.wbits - 1)  # compressed-tensors stores signed codes: q - 2^(b-1)
    state = {"weight": W.detach(), "weight_scale": grid.scale.to(torch.float32)}
    if not grid.sym:
        state["weight_zero_point"] = (grid.zero - offset).to(torch.int8)
    if grid.g_idx is not None:
        state["weight_g_idx"] = grid.g_idx
    packed = Packed.compress(dict(state), scheme)
    codes = unpack_from_int32(packed["weight_packed"], grid.wbits, packed["weight_shape"]).to(torch.int16) + offset
    if not torch.equal(codes, grid.codes):
        raise GridError(f"{name}: compressed-tensors computed other codes than the solver's grid")
    back = Packed.decompress({k: v.clone() for k, v in packed.items()}, scheme)["weight"]
    if not torch.equal(back.to(W.dtype), W.detach()):
        raise GridError(f"{name}: compressed-tensors' decompress does not give back the quantized weights exactly")
    return packed


def _shared_with_earlier(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor shares storage with an earlier key (tied lm_head): safetensors stores each once."""
    seen, dup = set(), set()
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            dup.add(k)
        seen.add(ptr)
    return dup


def write_compressed(model: torch.nn.Module, tokenizer, grids: dict[str, LayerGrid], out_dir: str | os.PathLike,
                     recipe: dict | None = None) -> dict:
    """Write the compressed-tensors folder ``out_dir`` (atomically: a temporary folder renamed at the end).
    Returns {format, path, bytes, layers, config_groups}."""
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _quiet_compressed_tensors():
        state = dict(model.state_dict())
        for k in _shared_with_earlier(state):
            state.pop(k)
        groups: dict[tuple, tuple] = {}
        for name, grid in grids.items():
            args = _weight_args(grid)
            key = _scheme_key(grid)
            scheme = QuantizationScheme(targets=[name], weights=args, format=CT_FORMAT)
            packed = compress_layer(model.get_submodule(name).weight.detach().cpu(), grid, scheme, name)
            state.pop(f"{name}.weight")
            state.update({f"{name}.{k}": v for k, v in packed.items()})
            groups.setdefault(key, (args, []))[1].append(name)
        linears = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
        ignore = [n for n in linears if n not in grids]
        if len(groups) == 1:  # the usual shape: every Linear but the ignored ones (lm_head)
            (args, _), = groups.values()
            config_groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args, format=CT_FORMAT)}
        else:  # grids of several shapes (e.g. g128 on 576 and 1536 inputs): each group lists its modules
            config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=args, format=CT_FORMAT)
                             for i, (args, names) in enumerate(groups.values())}
        qconfig = QuantizationConfig(config_groups=config_groups, format=CT_FORMAT,
                                     quantization_status="compressed", ignore=ignore)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        config.use_cache = True  # the jobs turn the KV cache off; an inference checkpoint wants it
        config.save_pretrained(tmp)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / RECIPE_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"source": "oac-repro", "compressed_tensors": compressed_tensors.__version__, **(recipe or {})})))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    record = {"format": COMPRESSED_TENSORS, "path": str(out), "bytes": dir_bytes(out), "layers": len(grids),
              "config_groups": len(config_groups)}
    log.info("exported %d quantized linears to %s (compressed-tensors %s, %.1f MB)", len(grids), out, CT_FORMAT,
             record["bytes"] / 1e6)
    return record


def dir_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def dense_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors as stored densely in its dtype (tied weights once)."""
    state = dict(model.state_dict())
    for k in _shared_with_earlier(state):
        state.pop(k)
    return sum(v.numel() * v.element_size() for v in state.values())


# --- job directories ---------------------------------------------------------------------------------------------

def recipe_of(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in ("config_hash", "model", "method", "calib", "calibration", "bits", "dtype")}


def export_saved(job_dir: str | os.PathLike, model, tokenizer, manifest: dict, masks: dict,
                 out_dir: str | os.PathLike | None = None) -> dict:
    """Export the model of a native save (``model`` holds its weights) to ``<job>/compressed`` (or ``out_dir``)."""
    method = manifest["method"]
    from oac import method as methods

    m = methods.resolve(method)
    check_format_supported(COMPRESSED_TENSORS, m.name, solver_formats(m))
    grids = grids_from_masks(model, masks, method)
    out = Path(out_dir) if out_dir else Path(job_dir) / EXPORT_DIR
    record = write_compressed(model, tokenizer, grids, out, recipe=recipe_of(manifest))
    record["dense_bytes"] = dense_bytes(model)
    return record


def drop_native_blocks(job_dir: str | os.PathLike, record: dict) -> None:
    """Keep only the manifest of the native save (it now points at the export: ``quantized_from`` still works)."""
    from oac.jobdir.saved import MANIFEST, quantized_dir, read_manifest

    manifest = read_manifest(job_dir)
    qdir = quantized_dir(job_dir)
    for f in manifest.get("files", []):
        (qdir / f).unlink(missing_ok=True)
    manifest["files"] = []
    manifest["saved_format"] = COMPRESSED_TENSORS
    manifest["export_dir"] = os.path.relpath(record["path"], qdir)
    write_json_atomic(qdir / MANIFEST, manifest)


def export_job(job_dir: str | os.PathLike, *, cache_dir: str = ".cache", out_dir: str | os.PathLike | None = None,
               drop_native: bool = False) -> dict:
    """``python -m experiments.export``: convert the native save of a finished job (no re-quantization)."""
    from oac.jobdir.saved import load_masks, load_quantized, read_manifest

    manifest = read_manifest(job_dir)
    if manifest.get("saved_format") == COMPRESSED_TENSORS:
        raise ConfigError(f"{job_dir}: already exported ({manifest.get('export_dir')}); its native blocks are gone")
    from oac import method as methods

    m = methods.resolve(manifest["method"])
    check_format_supported(COMPRESSED_TENSORS, m.name, solver_formats(m))  # before the model loads
    model, tok, manifest = load_quantized(job_dir, cache_dir=cache_dir)
    record = export_saved(job_dir, model, tok, manifest, load_masks(job_dir), out_dir)
    if drop_native:
        drop_native_blocks(job_dir, record)
    return record


def save_record(job_dir: str | os.PathLike, cfg: DictConfig, model, tokenizer, result: dict) -> dict:
    """After the native save of a job: export it if ``save_format=compressed-tensors``, and return
    ``result["saved"]`` (format, path, bytes on disk, dense bytes of the model). The native block files go once the
    job is complete (:func:`finish_save`): until then they are the crash checkpoint's blocks."""
    from oac.jobdir.saved import load_masks, quantized_dir, read_manifest

    fmt = cfg.get("save_format") or NATIVE
    if fmt == NATIVE:
        qdir = quantized_dir(job_dir)
        record = {"format": NATIVE, "path": str(qdir), "bytes": dir_bytes(qdir), "dense_bytes": dense_bytes(model)}
        log.info("native save: %s (%.1f MB; the model's dense tensors: %.1f MB)", qdir, record["bytes"] / 1e6,
                 record["dense_bytes"] / 1e6)
        return record
    return export_saved(job_dir, model, tokenizer, read_manifest(job_dir), load_masks(job_dir))


def finish_save(job_dir: str | os.PathLike, cfg: DictConfig) -> None:
    """A complete job with ``save_format=compressed-tensors``: drop the native block files (the export has them)."""
    from oac.jobdir.saved import read_manifest

    out = Path(job_dir) / EXPORT_DIR
    if (cfg.get("save_format") or NATIVE) != COMPRESSED_TENSORS or not (out / WEIGHTS_FILE).exists():
        return
    if read_manifest(job_dir).get("saved_format") != COMPRESSED_TENSORS:
        drop_native_blocks(job_dir, {"path": str(out)})


def restore_compressed(model: torch.nn.Module, job_dir: str | os.PathLike, manifest: dict) -> int:
    """Put the weights of a job's compressed-tensors export into ``model`` (same base), decompressed by
    compressed-tensors. Returns the number of linears restored."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as Packed
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    from oac.jobdir.saved import quantized_dir

    out = (quantized_dir(job_dir) / manifest["export_dir"]).resolve()
    with open(out / "config.json") as f:
        qconfig = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    tensors = load_file(str(out / WEIGHTS_FILE))
    names = sorted({k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")})
    with _quiet_compressed_tensors():
        for name in names:
            module = model.get_submodule(name)
            scheme = next((s for s in qconfig.config_groups.values()
                           if is_match(name, module, s.targets, qconfig.ignore or [])), None)
            if scheme is None:
                raise ConfigError(f"{out}: no config group of quantization_config matches {name}")
            local = {k.removeprefix(name + "."): v for k, v in tensors.items()
                     if k.startswith(name + ".") and "." not in k.removeprefix(name + ".")}
            W = Packed.decompress(local, scheme)["weight"]
            if W.shape != module.weight.shape:
                raise ConfigError(f"{out}: {name} has shape {tuple(W.shape)}, the model {tuple(module.weight.shape)}")
            module.weight.data.copy_(W.to(module.weight.device, module.weight.dtype))
    return len(names)
