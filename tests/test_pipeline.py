"""Model adapter and sequential pipeline (METHODS.md A5, D.9)."""

import pytest
import torch

from oac.eval.perplexity import perplexity
from oac.hessian.layerwise import LayerwiseHessian
from oac.models import Adapter, family_of, run_block
from oac.pipeline import catch_block_inputs, propagate, quantize_model
from oac.solvers import get_solver
from tests.helpers import tiny_llama, tiny_opt


def test_stories_greedy_generation(stories):
    model, tok = stories
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith(", there was a little girl named Lily")


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_catch_and_replay_equals_model_forward(make, batch_size):
    model = make()
    adapter = Adapter(model, family_of(model.config.model_type))
    ids = torch.randint(0, 96, (3, 16))
    inps, kwargs = catch_block_inputs(adapter, ids, "cpu", batch_size=batch_size)
    for block in adapter.blocks:
        inps = propagate(block, inps, kwargs, "cpu", batch_size)
    with torch.no_grad():
        ref = model(ids).logits
        got = adapter.logits(inps)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_identity_solver_keeps_perplexity(stories, data_dir):
    """An identity solver through the whole pipeline reproduces the FP perplexity exactly (D.9)."""
    from oac.data.tokens import eval_stream

    model, tok = stories
    ids = eval_stream(tok, "wikitext2", 256, data_dir=data_dir)
    before = perplexity(model, ids, 256, max_windows=4)["ppl"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    solve, cfg = get_solver("identity")
    adapter = Adapter(model, "llama")
    calib = torch.randint(0, 512, (4, 64))
    state = quantize_model(adapter, calib, LayerwiseHessian(), solve, cfg(), device="cpu", true_sequential=True)
    assert len(state.layers) == 5 * 7
    after = perplexity(model, ids, 256, max_windows=4)["ppl"]
    assert after == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_layerwise_hessian_matches_definition():
    """H = (2/N) Σ_i X_iᵀX_i from the running average equals the direct formula."""
    from oac.hessian.base import BlockContext

    model = tiny_llama()
    adapter = Adapter(model, "llama")
    ids = torch.randint(0, 96, (5, 8))
    inps, kwargs = catch_block_inputs(adapter, ids, "cpu", batch_size=2)
    block = adapter.blocks[0]
    lin = adapter.linears(block)
    ctx = BlockContext(0, block, inps, kwargs, ids, adapter, torch.device("cpu"), batch_size=2)
    H = LayerwiseHessian().hessians(ctx, {"self_attn.q_proj": lin["self_attn.q_proj"]})["self_attn.q_proj"]
    xs = []
    h = block.input_layernorm.register_forward_hook(lambda m, i, o: xs.append(o.detach()))
    with torch.no_grad():
        for i in range(5):
            run_block(block, inps[i:i + 1], {k: v for k, v in kwargs.items() if k != "_capture_batch"})
    h.remove()
    X = torch.cat(xs).reshape(-1, 32).double()
    torch.testing.assert_close(H.double(), 2 / 5 * X.T @ X, rtol=1e-5, atol=1e-6)
