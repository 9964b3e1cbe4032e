"""Convert the native save of a finished uniform-grid job (RTN, GPTQ, OAC-GPTQ; ``save=true``) into a checkpoint
others can load, without re-quantizing:

    python -m experiments.export outputs/runs/smollm2-135m/gptq/<time> --format compressed-tensors
        [--out DIR] [--drop-native] [--cache-dir .cache]

writes ``<job>/compressed/`` (oac/jobdir/export.py), loadable with ``AutoModelForCausalLM.from_pretrained``.
``--drop-native`` then deletes the native block files (the manifest stays and points at the export, so
``quantized_from=<job>`` keeps working). Bad input (no saved model, SpQR/BiLLM, unknown format) is one line and
exit code 2, before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from oac.errors import ConfigError

log = logging.getLogger("experiments.export")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    p.add_argument("job_dir", help="a job directory with a native save (<job>/quantized/manifest.json)")
    p.add_argument("--format", default="compressed-tensors", help="compressed-tensors (the only export format)")
    p.add_argument("--out", default=None, help="output folder (default <job>/compressed)")
    p.add_argument("--drop-native", action="store_true", help="delete the native block files after the export")
    p.add_argument("--cache-dir", default=os.environ.get("OAC_CACHE", ".cache"),
                   help="where converted base models live (default $OAC_CACHE or .cache)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from oac.jobdir.export import COMPRESSED_TENSORS, export_job

    try:
        if args.format != COMPRESSED_TENSORS:
            raise ConfigError(f"--format must be {COMPRESSED_TENSORS} (the native save is the other format); "
                              f"got {args.format!r}")
        record = export_job(args.job_dir, cache_dir=args.cache_dir, out_dir=args.out, drop_native=args.drop_native)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
