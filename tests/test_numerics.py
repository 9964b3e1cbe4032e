"""jitter_seed: a one-ulp, seeded, symmetric perturbation of H; the default path never touches H."""

from __future__ import annotations

import torch

from oac.jobdir import config_hash
from oac.numerics import EPS, jitter
from oac.pipeline import quantize_model
from tests.helpers import ROOT, correlated_H


def test_jitter_is_symmetric_seeded_and_one_ulp():
    H = correlated_H(64, seed=0).float()
    a, b, c = jitter(H, 1, 0, "q"), jitter(H, 1, 0, "q"), jitter(H, 2, 0, "q")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, jitter(H, 1, 1, "q"))
    assert torch.equal(a, a.T) and a.dtype == H.dtype
    rel = ((a.double() - H.double()).abs() / H.double().abs().clamp(min=1e-30)).max()
    assert 0 < rel <= 2 * EPS
    stacked = jitter(torch.stack([H, H]), 1, 0, "q")
    assert stacked.shape == (2, 64, 64) and torch.equal(stacked[0], stacked[0].T)


def _compose(*overrides):
    """The configs exactly as the command line composes them (default paths: they are part of the hash)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_hash_is_unchanged_by_the_new_keys():
    compose = _compose
    base = compose("experiment=main_cpu", "setting=spqr_w2_o1", "calib.seed=0", "model=smollm2-135m")
    # the committed main_cpu seed-0 SpQR job: jitter_seed and eval.ppl.max_tokens at their defaults leave it
    assert config_hash(base) == "e01e7242159ff84a"
    assert config_hash(compose("method=gptq")) == "d3cddb315f23e66b"
    assert config_hash(compose("experiment=main_cpu", "setting=spqr_w2_o1", "calib.seed=0", "model=smollm2-135m",
                               "jitter_seed=1")) != "e01e7242159ff84a"


def test_jitter_changes_the_hessians_the_solver_sees_and_nothing_else(monkeypatch):
    from tests.helpers import tiny_llama
    from oac.hessian.layerwise import LayerwiseHessian
    from oac.models import Adapter

    seen = {}

    def solve(W, H, cfg):
        seen.setdefault(cfg, []).append(H.clone())

        class R:
            weight, stats = W, {}
        return R

    for js in (None, 3):
        model = tiny_llama()
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        quantize_model(Adapter(model, "llama"), ids, LayerwiseHessian(), solve, js, device="cpu", jitter_seed=js)
    plain, jittered = seen[None], seen[3]
    assert len(plain) == len(jittered)
    for a, b in zip(plain, jittered):
        assert not torch.equal(a, b) and torch.allclose(a, b, rtol=3 * EPS, atol=0)
