"""Copy the complete results of a sweep into the committed tree, one ``result.json`` per job directory.

    python -m experiments.collect outputs/main_cpu results/raw/main_cpu

Only ``status: complete`` results are copied (a running or failed job stays in outputs/); an existing copy is
replaced only by a result of the same ``config_hash``, so a table never silently changes configuration, and never
by a copy (``reused_from``: on a fresh clone a job may be copied from this very tree), so the original stays. The
committed tree is what ``experiments.report --outputs`` reads and what ``reuse_roots`` resumes from on a fresh
clone (oac/jobdir/reuse.py).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from oac.jobdir.record import RESULT_FILE, read_result

log = logging.getLogger("experiments.collect")


def collect(src: Path, dst: Path) -> tuple[int, int]:
    """Copy every complete ``src/<job>/result.json`` to ``dst/<job>/``; returns (copied, skipped): skipped = not
    complete, or a copy where the original is committed."""
    copied = skipped = 0
    for path in sorted(src.glob(f"*/{RESULT_FILE}")):
        r = read_result(path)
        if not r or r.get("status") != "complete":
            skipped += 1
            continue
        target = dst / path.parent.name / RESULT_FILE
        old = read_result(target) if target.exists() else None
        if old and old.get("config_hash") != r.get("config_hash"):
            raise SystemExit(f"{target}: committed with config_hash {old.get('config_hash')}, "
                             f"{path} has {r.get('config_hash')}: move the old table away first")
        if old and old.get("status") == "complete" and not old.get("reused_from") and r.get("reused_from"):
            skipped += 1  # the committed original beats a copy of it (or of its twin)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += 1
    return copied, skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a sweep directory: outputs/<tag>")
    ap.add_argument("dst", type=Path, help="results/raw/<tag>")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    copied, skipped = collect(args.src, args.dst)
    log.info("%d complete result(s) copied to %s, %d left out (not complete, or a copy of a committed original)", copied, args.dst, skipped)


if __name__ == "__main__":
    main()
