"""Evaluation corpora and calibration windows (PROTOCOLS.md §1-2), local mirrors or the HF hub."""

from oac.data.text import check_available, file_digest, load_rows, source_digest, verify_file  # noqa: F401
from oac.data.tokens import calibration_windows, eval_stream  # noqa: F401
