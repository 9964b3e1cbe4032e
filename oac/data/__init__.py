"""Evaluation corpora and calibration windows (PROTOCOLS.md §1-2), local mirrors or the HF hub."""

from oac.data.text import load_rows  # noqa: F401
from oac.data.tokens import calibration_windows, eval_stream  # noqa: F401
