"""Re-derive the ``config_hash`` of committed results after a change to the identity rules (oac/jobdir/identity.py).

    python -m experiments.rehash results/raw            # report what would change
    python -m experiments.rehash results/raw --write    # rewrite those result.json files

A job's hash is a function of its stored, resolved ``config``; when a key is declared volatile (it never changes
a number) the hashes of the jobs that carry it change while their numbers do not. This rewrites ``config_hash``
(and ``reused_from.config_hash`` of copies, from the original's tag) to what the current rules give for the
stored config. Nothing else in the file is touched; a result without a stored config is left alone and reported.
Regenerate the tables afterwards (``experiments.report --outputs results/raw/<tag>``): their runs CSVs carry hashes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from oac.jobdir.identity import config_hash
from oac.jobdir.record import RESULT_FILE, read_result, write_result

log = logging.getLogger("experiments.rehash")


def rehash(result: dict) -> dict:
    """``result`` with its hashes re-derived from its stored config (a new dict; the input is not changed)."""
    cfg = result["config"]
    new = {**result, "config_hash": config_hash(cfg)}
    src = result.get("reused_from")
    if isinstance(src, dict) and src.get("config_hash"):
        new["reused_from"] = {**src, "config_hash": config_hash({**cfg, "tag": src.get("tag")})}
    return new


def rehash_tree(root: Path, write: bool = False) -> tuple[list[Path], list[Path]]:
    """(results whose hashes change, results without a stored config) under ``root``; ``write`` rewrites the former."""
    changed, skipped = [], []
    for path in sorted(root.rglob(RESULT_FILE)):
        r = read_result(path)
        if not r or not isinstance(r.get("config"), dict):
            skipped.append(path)
            continue
        new = rehash(r)
        if new != r:
            changed.append(path)
            log.info("%s: %s -> %s", path.parent, r.get("config_hash"), new["config_hash"])
            if write:
                write_result(path.parent, new)
    return changed, skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a tree of job directories, e.g. results/raw")
    ap.add_argument("--write", action="store_true", help="rewrite the changed result.json files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    changed, skipped = rehash_tree(args.root, write=args.write)
    log.info("%d result(s) %s, %d without a stored config left alone", len(changed),
             "rewritten" if args.write else "would change (--write rewrites them)", len(skipped))


if __name__ == "__main__":
    main()
