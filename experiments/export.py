"""Convert the native save of a finished uniform-grid job (RTN, GPTQ, OAC-GPTQ; ``save=true``) into a checkpoint
others can load, without re-quantizing:

    python -m experiments.export outputs/runs/smollm2-135m/gptq/<time> --format compressed-tensors
        [--out DIR] [--drop-native] [--verify] [--cache-dir .cache]

writes ``<job>/compressed/`` (oac/jobdir/export.py), loadable with ``AutoModelForCausalLM.from_pretrained``.
``--drop-native`` then deletes the native block files (the manifest stays and points at the export, so
``quantized_from=<job>`` keeps working). ``--verify`` reloads the export with plain
``AutoModelForCausalLM.from_pretrained`` and evaluates it with the job's perplexity settings (result.json) next to
the job's own numbers (exit 1 if they differ); a job exported in-job (``save_format=compressed-tensors``) is only
verified. Bad input (no saved model, SpQR/BiLLM, unknown format) is one line and exit code 2, before the model
loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from oac.errors import ConfigError

log = logging.getLogger("experiments.export")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    p.add_argument("job_dir", help="a job directory with a native save (<job>/quantized/manifest.json)")
    p.add_argument("--format", default="compressed-tensors", help="compressed-tensors (the only export format)")
    p.add_argument("--out", default=None, help="output folder (default <job>/compressed)")
    p.add_argument("--drop-native", action="store_true", help="delete the native block files after the export")
    p.add_argument("--verify", action="store_true",
                   help="reload the export with from_pretrained and compare its perplexity with the job's")
    p.add_argument("--cache-dir", default=os.environ.get("OAC_CACHE", ".cache"),
                   help="where converted base models live (default $OAC_CACHE or .cache)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from oac.jobdir.export import COMPRESSED_TENSORS, EXPORT_DIR, export_job
    from oac.jobdir.saved import read_manifest

    try:
        if args.format != COMPRESSED_TENSORS:
            raise ConfigError(f"--format must be {COMPRESSED_TENSORS} (the native save is the other format); "
                              f"got {args.format!r}")
        done = read_manifest(args.job_dir).get("saved_format") == COMPRESSED_TENSORS
        if done and args.verify:
            record = {"path": args.out or str(Path(args.job_dir) / EXPORT_DIR), "exported": "in the job"}
        else:
            record = export_job(args.job_dir, cache_dir=args.cache_dir, out_dir=args.out,
                                drop_native=args.drop_native)
        if args.verify:
            record["verify"] = verify_export(args.job_dir, record["path"], cache_dir=args.cache_dir)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    print(json.dumps(record))
    return 0 if not args.verify or record["verify"]["equal"] else 1


def verify_export(job_dir: str | os.PathLike, export_dir: str | os.PathLike, *, cache_dir: str) -> dict:
    """Perplexity of the export, reloaded with plain transformers, under the job's settings, next to the job's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oac.data.tokens import eval_stream
    from oac.eval.perplexity import perplexity
    from oac.jobdir.record import RESULT_FILE, read_result

    result = read_result(Path(job_dir) / RESULT_FILE)
    if not result or result.get("status") != "complete":
        raise ConfigError(f"{job_dir}: no complete result.json to compare with")
    cfg = result["config"]
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    pcfg, ppl = cfg["eval"]["ppl"], {}
    for name in pcfg["datasets"]:
        ids = eval_stream(tok, name, pcfg["seqlen"], data_dir=cfg["paths"]["data_dir"], cache_dir=cache_dir)
        with torch.no_grad():
            ppl[name] = perplexity(model, ids, pcfg["seqlen"], batch_size=pcfg.get("batch_size", 1),
                                   max_windows=pcfg.get("max_windows"), desc=f"ppl {name}")["ppl"]
        log.info("%s: export ppl %.6f, job ppl %.6f", name, ppl[name], result["ppl"].get(name, float("nan")))
    return {"ppl_export": ppl, "ppl_job": result["ppl"], "equal": ppl == result["ppl"]}


if __name__ == "__main__":
    sys.exit(main())
