"""Evaluation: perplexity (GPTQ protocol) and zero-shot accuracy (lm-evaluation-harness)."""
