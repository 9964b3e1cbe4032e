"""oac-repro: OAC (output-adaptive calibration) and its PTQ baselines (RTN, GPTQ, SpQR, BiLLM)."""

__version__ = "0.1.0"
