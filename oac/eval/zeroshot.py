"""Zero-shot accuracy (and GSM8K few-shot exact match) through lm-evaluation-harness (PROTOCOLS.md §3).

The model is evaluated **in memory** (possibly quantized): it is wrapped in lm-eval's ``HFLM`` and passed to
``lm_eval.simple_evaluate``. Tested with lm-eval 0.4.13.

Task data
---------
Every task can run in one of two ways:

* ``offline``: the built-in lm-eval task is kept and only its data source is redirected to local JSONL files
  (``shared/data/README.md`` "How to use these files"). For each task a small YAML is written under
  ``<work_dir>/lm_eval_tasks/`` that ``include:``\\ s the installed built-in YAML (absolute path), renames the task
  to ``<name>_local``, sets ``tag: []``, ``dataset_path: json``, ``dataset_name: null``,
  ``dataset_kwargs.data_files`` and nulls the splits that have no file. Prompts, choices, targets, metrics and
  ``!function`` preprocessing therefore stay those of the installed lm-eval version.
* ``online``: the upstream task name is used unchanged (needs network or a pre-populated ``HF_HOME``).

``mode`` selects between them:

* ``"offline"``: every task offline; a missing local file is a :class:`~oac.errors.ConfigError`.
* ``"online"``: every task online.
* ``"auto"`` (default), decided **per task**: a task runs offline when all of its local files exist under
  ``data_dir``. Otherwise it runs online, unless ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true
  value, in which case it is a :class:`~oac.errors.ConfigError` naming the missing file. Deciding per task keeps
  e.g. ARC on the local subset whether or not GSM8K (which has no local file here) is requested in the same run.

Metrics
-------
All results are fractions in [0, 1]. ``acc`` and ``acc_norm`` are both stored (WinoGrande has ``acc`` only);
the metric that enters the paper-style average is chosen per task by :data:`DEFAULT_METRIC_MAP` (the one place
for that choice; override it with ``metric_map``). GSM8K is reported but never averaged with the five tasks.

Standard errors: lm-eval computes no stderr when ``bootstrap_iters == 0`` (it reports "N/A", stored here as
``None``). For mean-aggregated metrics (every metric of these tasks, GSM8K's exact_match included) any
``bootstrap_iters > 0`` gives the closed-form ``sample_std / sqrt(n)`` without resampling, so the default ``1``
costs nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oac.data.text import offline
from oac.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """How one canonical task is run from the built-in lm-eval YAML and (offline) from local files."""

    name: str
    builtin_yaml: str  # relative to the installed lm_eval package directory
    data_files: dict[str, str]  # split -> file relative to data_dir (the split the task scores, + few-shot split)
    scored_split: str
    metrics: tuple[str, ...]  # metric keys as returned here (lm-eval key with ",none" dropped)
    local_overrides: dict[str, Any] = field(default_factory=dict)  # extra keys of the generated YAML
    num_fewshot: int = 0  # protocol default
    in_average: bool = True
    opt_in: bool = False  # not part of the default task list


_MC = ("acc", "acc_norm")

TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        name="arc_easy",
        builtin_yaml="tasks/arc/arc_easy.yaml",
        data_files={"test": "zeroshot/arc_easy.test.jsonl"},
        scored_split="test",
        metrics=_MC,
        local_overrides={"training_split": None, "validation_split": None},
    ),
    "arc_challenge": TaskSpec(
        name="arc_challenge",
        builtin_yaml="tasks/arc/arc_challenge.yaml",
        data_files={"test": "zeroshot/arc_challenge.test.jsonl"},
        scored_split="test",
        metrics=_MC,
        local_overrides={"training_split": None, "validation_split": None},
    ),
    "hellaswag": TaskSpec(
        name="hellaswag",
        builtin_yaml="tasks/hellaswag/hellaswag.yaml",
        data_files={"validation": "zeroshot/hellaswag.validation.jsonl"},
        scored_split="validation",
        metrics=_MC,
        local_overrides={"training_split": None},
    ),
    "piqa": TaskSpec(
        name="piqa",
        builtin_yaml="tasks/piqa/piqa.yaml",
        data_files={"validation": "zeroshot/piqa.validation.jsonl"},
        scored_split="validation",
        metrics=_MC,
        local_overrides={"training_split": None},
    ),
    "winogrande": TaskSpec(
        name="winogrande",
        builtin_yaml="tasks/winogrande/default.yaml",
        data_files={"validation": "zeroshot/winogrande.validation.jsonl"},
        scored_split="validation",
        metrics=("acc",),
        local_overrides={"training_split": None},
    ),
    # Opt-in: 5-shot exact match, few-shot examples from the train split. No local files exist in shared/data;
    # offline it runs only if someone provides both files (schema of openai/gsm8k "main": question, answer).
    "gsm8k": TaskSpec(
        name="gsm8k",
        builtin_yaml="tasks/gsm8k/gsm8k.yaml",
        data_files={"test": "zeroshot/gsm8k.test.jsonl", "train": "zeroshot/gsm8k.train.jsonl"},
        scored_split="test",
        metrics=(
            "exact_match,strict-match",
            "exact_match,flexible-extract",
        ),
        num_fewshot=5,
        in_average=False,
        opt_in=True,
    ),
}

#: The five zero-shot tasks of the paper's reasoning table, in table order.
DEFAULT_TASKS: tuple[str, ...] = tuple(n for n, s in TASKS.items() if not s.opt_in)

#: THE place where the metric per task is chosen for the average (and for table columns).
#: The OAC paper does not say whether it reports acc or acc_norm; "acc everywhere" is the default here.
DEFAULT_METRIC_MAP: dict[str, str] = {
    "arc_easy": "acc",
    "arc_challenge": "acc",
    "hellaswag": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "gsm8k": "exact_match,strict-match",
}

#: The convention used by many quantization papers (Open-LLM-Leaderboard style), for comparisons.
LEADERBOARD_METRIC_MAP: dict[str, str] = {**DEFAULT_METRIC_MAP, "arc_challenge": "acc_norm", "hellaswag": "acc_norm"}

MODES = ("auto", "offline", "online")


# ----------------------------------------------------------------------------------------------- helpers


def lm_eval_package_dir() -> Path:
    """Directory of the installed ``lm_eval`` package (without importing it: that takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ConfigError("lm-eval is not installed (pip install 'lm-eval[hf]==0.4.13')")
    return Path(spec.origin).parent


def local_task_name(name: str) -> str:
    """Name of the generated offline task (must not clash with the built-in one)."""
    return f"{name}_local"


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Canonical task names, validated, duplicates removed (order kept). ``None`` means the five default tasks."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names: list[str] = []
    for t in tasks:
        t = str(t).strip()
        if t not in TASKS:
            raise ConfigError(f"unknown zero-shot task {t!r}; known tasks: {', '.join(TASKS)}")
        if t not in names:
            names.append(t)
    if not names:
        raise ConfigError(f"no zero-shot tasks given; known tasks: {', '.join(TASKS)}")
    return names


def local_files(name: str, data_dir: str | os.PathLike | None) -> dict[str, Path]:
    """split -> absolute path of the local file(s) of a task under ``data_dir``."""
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else Path("<paths.data_dir unset>")
    return {split: root / rel for split, rel in TASKS[name].data_files.items()}


def _missing_file_error(name: str, missing: Path, data_dir: Any, why: str) -> ConfigError:
    return ConfigError(
        f"zero-shot task {name!r} ({why}) needs the local file {missing}, which does not exist; "
        f"set paths.data_dir=/path/to/shared/data (currently {data_dir}) so that it points at it, "
        f"or use eval.zeroshot.mode=online (needs network or a pre-populated HF cache)"
    )


def resolve_modes(names: Sequence[str], mode: str, data_dir: str | os.PathLike | None) -> dict[str, str]:
    """task -> "offline" | "online" following the rule in the module docstring; raises ConfigError early."""
    if mode not in MODES:
        raise ConfigError(f"eval.zeroshot.mode must be one of {', '.join(MODES)}, got {mode!r}")
    out: dict[str, str] = {}
    for name in names:
        if mode == "online":
            out[name] = "online"
            continue
        files = local_files(name, data_dir)
        missing = [p for p in files.values() if data_dir is None or not p.is_file()]
        if not missing:
            out[name] = "offline"
        elif mode == "offline":
            raise _missing_file_error(name, missing[0], data_dir, "mode=offline")
        elif offline():
            raise _missing_file_error(name, missing[0], data_dir, "mode=auto with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set")
        else:
            log.info("zero-shot task %s: no local file %s, using the upstream (online) task", name, missing[0])
            out[name] = "online"
    return out


def local_task_config(name: str, data_dir: str | os.PathLike) -> dict[str, Any]:
    """The YAML content (as a dict) of the offline task ``<name>_local``."""
    spec = TASKS[name]
    return {
        "include": str(lm_eval_package_dir() / spec.builtin_yaml),
        "task": local_task_name(name),
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(p) for s, p in local_files(name, data_dir).items()}},
        **spec.local_overrides,
    }


def write_local_task_yamls(names: Sequence[str], data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write one include-YAML per task into ``out_dir``; returns task -> YAML path. Use with
    ``TaskManager(include_path=out_dir)`` and the task names ``<name>_local``."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in names:
        path = out / f"{local_task_name(name)}.yaml"
        path.write_text(yaml.safe_dump(local_task_config(name, data_dir), sort_keys=False))
        paths[name] = path
    return paths


def _resolve_num_fewshot(names: Sequence[str], num_fewshot: int | Mapping[str, int] | None) -> dict[str, int]:
    per = {n: TASKS[n].num_fewshot for n in names}
    if num_fewshot is None:
        pass
    elif isinstance(num_fewshot, Mapping):
        for k, v in num_fewshot.items():
            if k not in TASKS:
                raise ConfigError(f"num_fewshot names unknown task {k!r}; known tasks: {', '.join(TASKS)}")
            if k in per:
                per[k] = v
    else:
        per = {n: num_fewshot for n in names}
    for n, v in per.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"eval.zeroshot.num_fewshot must be an int >= 0, got {v!r} for {n}")
    return per


def _resolve_metric_map(names: Sequence[str], metric_map: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(DEFAULT_METRIC_MAP)
    for k, v in (metric_map or {}).items():
        if k not in TASKS:
            raise ConfigError(f"metric_map names unknown task {k!r}; known tasks: {', '.join(TASKS)}")
        if v not in TASKS[k].metrics:
            raise ConfigError(f"metric_map[{k!r}]={v!r} is not a metric of {k}; choose one of {', '.join(TASKS[k].metrics)}")
        merged[k] = v
    return {n: merged[n] for n in names}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(x: Any) -> Any:
    """Plain-JSON copy: callables become their qualified name, NaN/inf and lm-eval's "N/A" stay as given."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if callable(x):
        return f"{getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', repr(x))}"
    if hasattr(x, "item"):  # numpy / torch scalars
        try:
            return _jsonable(x.item())
        except Exception:  # noqa: BLE001 - fall through to str
            pass
    return str(x)


def _metric_value(v: Any) -> float | None:
    if v is None or isinstance(v, str):  # lm-eval writes "N/A" for skipped stderr
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _bos_prepended(lm: Any) -> bool | None:
    """Whether HFLM's own encoding path (``tok_encode``, used for every log-likelihood request) puts BOS first."""
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = lm.tok_encode("Question: probe")
    except Exception:  # noqa: BLE001 - only a record, never fatal
        return None
    return bool(ids) and ids[0] == bos


# ----------------------------------------------------------------------------------------------- main entry


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    *,
    data_dir: str | os.PathLike | None,
    mode: str = "auto",
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    add_bos_token: bool = False,
    max_length: int | None = None,
    work_dir: str | os.PathLike | None = None,
    metric_map: Mapping[str, str] | None = None,
    bootstrap_iters: int = 1,
) -> dict[str, Any]:
    """Evaluate an in-memory causal LM on lm-eval tasks; returns a plain-JSON dict (see module docstring).

    Args:
        model: an ``nn.Module`` (HF causal LM) already on its device and dtype; lm-eval uses ``model.device``.
            Note that lm-eval's HFLM calls ``model.eval()`` and ``model.tie_weights()``; the training flag is
            restored afterwards.
        tokenizer: the tokenizer object (copied, so lm-eval's pad-token setup does not touch the caller's one).
        tasks: canonical names (``arc_easy, arc_challenge, hellaswag, piqa, winogrande``, opt-in ``gsm8k``);
            ``None`` = the five zero-shot tasks.
        data_dir: the shared data root (``paths.data_dir``), holding ``zeroshot/*.jsonl``.
        mode: ``auto`` | ``offline`` | ``online`` (see module docstring).
        num_fewshot: ``None`` = protocol default per task (0, GSM8K 5); an int for every task; or a dict per task.
        limit: items per task, for smoke tests only (numbers with a limit are never reported).
        batch_size: HFLM batch size; ``"auto"`` is accepted but discouraged (padding changes log-likelihoods).
        add_bos_token: explicit BOS choice passed to HFLM (PROTOCOLS.md §3.1); must be a bool.
        max_length: context length for HFLM; ``None`` = from the model config.
        work_dir: where the offline task YAMLs go (``<work_dir>/lm_eval_tasks``); ``None`` = a temporary directory.
        metric_map: per-task override of :data:`DEFAULT_METRIC_MAP` for the average.
        bootstrap_iters: passed to lm-eval; > 0 gives closed-form stderr for these tasks, 0 gives none.
    """
    # ---- validation: everything that can be wrong in the config fails here, before any model or data work
    names = resolve_tasks(tasks)
    if not isinstance(add_bos_token, bool):
        raise ConfigError(f"add_bos_token must be an explicit bool (PROTOCOLS.md §3.1), got {add_bos_token!r}")
    if isinstance(batch_size, bool) or not (
        (isinstance(batch_size, int) and batch_size >= 1) or (isinstance(batch_size, str) and batch_size.startswith("auto"))
    ):
        raise ConfigError(f"eval.zeroshot.batch_size must be an int >= 1 (or 'auto'), got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length must be None or an int >= 1, got {max_length!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ConfigError(f"eval.zeroshot.limit must be None or > 0, got {limit!r}")
    if not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise ConfigError(f"bootstrap_iters must be an int >= 0, got {bootstrap_iters!r}")
    shots = _resolve_num_fewshot(names, num_fewshot)
    mmap = _resolve_metric_map(names, metric_map)
    modes = resolve_modes(names, mode, data_dir)
    if isinstance(batch_size, str):
        log.warning("zero-shot batch_size=%r: padding changes log-likelihoods slightly; use an int for reported numbers", batch_size)
    if limit is not None:
        log.warning("zero-shot limit=%s: smoke-test numbers, never report them", limit)

    offline = [n for n in names if modes[n] == "offline"]
    tmp: tempfile.TemporaryDirectory | None = None
    try:
        yaml_dir: Path | None = None
        local_cfgs: dict[str, dict[str, Any]] = {}
        if offline:
            if work_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="oac_lm_eval_tasks_")
                yaml_dir = Path(tmp.name)
            else:
                yaml_dir = Path(work_dir) / "lm_eval_tasks"
            write_local_task_yamls(offline, data_dir, yaml_dir)  # type: ignore[arg-type]
            local_cfgs = {n: local_task_config(n, data_dir) for n in offline}  # type: ignore[arg-type]
        return _run(
            model,
            tokenizer,
            names,
            modes=modes,
            shots=shots,
            mmap=mmap,
            yaml_dir=yaml_dir,
            local_cfgs=local_cfgs,
            data_dir=data_dir,
            limit=limit,
            batch_size=batch_size,
            add_bos_token=add_bos_token,
            max_length=max_length,
            bootstrap_iters=bootstrap_iters,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(
    model: Any,
    tokenizer: Any,
    names: list[str],
    *,
    modes: dict[str, str],
    shots: dict[str, int],
    mmap: dict[str, str],
    yaml_dir: Path | None,
    local_cfgs: dict[str, dict[str, Any]],
    data_dir: Any,
    limit: int | float | None,
    batch_size: int | str,
    add_bos_token: bool,
    max_length: int | None,
    bootstrap_iters: int,
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_names = {n: local_task_name(n) if modes[n] == "offline" else n for n in names}
    all_offline = all(m == "offline" for m in modes.values())
    # The built-in index (~15k YAMLs, ~10 s) is only needed for online tasks; offline YAMLs include by abs path.
    tm = TaskManager(include_path=str(yaml_dir) if yaml_dir else None, include_defaults=not all_offline)
    loaded = tm.load([lm_names[n] for n in names])["tasks"]
    for n in names:
        loaded[lm_names[n]].set_config(key="num_fewshot", value=shots[n])

    was_training = bool(getattr(model, "training", False))
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=copy.deepcopy(tokenizer),
            batch_size=batch_size,
            max_length=max_length,
            add_bos_token=add_bos_token,
        )
        bos_prepended = _bos_prepended(lm)
        if add_bos_token and bos_prepended is False:
            log.warning("add_bos_token=True but this tokenizer does not prepend a BOS token: no BOS is used")
        log.info(
            "lm-eval %s: tasks=%s modes=%s add_bos_token=%s (BOS prepended: %s) batch_size=%s max_length=%s limit=%s",
            lm_eval.__version__, names, modes, add_bos_token, bos_prepended, batch_size, lm.max_length, limit,
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[loaded[lm_names[n]] for n in names],
            task_manager=tm,
            num_fewshot=None,  # set per task above
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
        eff_max_length = int(lm.max_length)
        device = str(lm.device)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if out is None:  # only non-zero ranks get None; we run single-process
        raise RuntimeError("lm_eval.simple_evaluate returned no results")

    # ---- plain-JSON result with canonical task names
    results: dict[str, Any] = {}
    for n in names:
        raw = out["results"][lm_names[n]]
        entry: dict[str, Any] = {}
        for key, val in raw.items():
            if "," not in key:  # name, alias, sample_len
                continue
            metric, filt = key.split(",", 1)
            entry[metric if filt == "none" else key] = _metric_value(val)
        ns = out["n-samples"][lm_names[n]]
        entry["n"] = int(ns["effective"])
        entry["n_total"] = int(ns["original"])
        entry["metric_for_avg"] = mmap[n]
        if entry.get(mmap[n]) is None:
            log.error("zero-shot task %s: metric %r missing from lm-eval's results %s", n, mmap[n], sorted(raw))
        results[n] = entry
        log.info(
            "zero-shot %s [%s]: %s (n=%d/%d)", n, modes[n],
            ", ".join(f"{k}={v:.4f}" for k, v in entry.items() if k in TASKS[n].metrics and v is not None),
            entry["n"], entry["n_total"],
        )

    avg_tasks = [n for n in names if TASKS[n].in_average]
    vals = [results[n].get(mmap[n]) for n in avg_tasks]
    average = {
        "value": (sum(vals) / len(vals)) if vals and all(v is not None for v in vals) else None,
        "metric_map": {n: mmap[n] for n in avg_tasks},
        "tasks": avg_tasks,
        "complete": set(avg_tasks) == set(DEFAULT_TASKS),
    }

    task_configs: dict[str, Any] = {}
    for n in names:
        cfg = out["configs"].get(lm_names[n], {})
        tc: dict[str, Any] = {
            "lm_eval_task": lm_names[n],
            "mode": modes[n],
            "builtin_yaml": str(lm_eval_package_dir() / TASKS[n].builtin_yaml),
            "dataset_path": cfg.get("dataset_path"),
            "dataset_name": cfg.get("dataset_name"),
            "scored_split": TASKS[n].scored_split,
        }
        if modes[n] == "offline":
            files = local_files(n, data_dir)
            tc["data_files"] = {s: str(p) for s, p in files.items()}
            tc["data_files_sha256"] = {s: _sha256(p) for s, p in files.items()}
            tc["local_yaml"] = local_cfgs[n]
        tc["config"] = _jsonable(cfg)
        task_configs[n] = tc

    mode_set = set(modes.values())
    result: dict[str, Any] = {
        "tasks": results,
        "average": average,
        "mode": mode_set.pop() if len(mode_set) == 1 else "mixed",
        "task_modes": dict(modes),
        "lm_eval_version": str(lm_eval.__version__),
        "transformers_version": _jsonable(out.get("transformers_version")),
        "add_bos_token": add_bos_token,
        "bos_prepended": bos_prepended,
        "num_fewshot": {n: _jsonable(out.get("n-shot", {}).get(lm_names[n], shots[n])) for n in names},
        "limit": limit,
        "batch_size": batch_size,
        "max_length": eff_max_length,
        "max_length_arg": max_length,
        "bootstrap_iters": bootstrap_iters,
        "device": device,
        "model_dtype": _model_dtype(model),
        "data_dir": str(data_dir) if data_dir is not None else None,
        "task_configs": task_configs,
        "versions": {n: _jsonable(out["versions"].get(lm_names[n])) for n in names},
    }
    json.dumps(result)  # fail here, not in the job runner, if anything is not plain JSON
    return result


def _model_dtype(model: Any) -> str | None:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except Exception:  # noqa: BLE001 - only a record
        return None
