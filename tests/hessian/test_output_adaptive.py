"""OAC output-adaptive Hessian (METHODS.md C2–C5, C7; property D.4) on tiny models."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from oac.errors import ConfigError
from oac.hessian.base import BlockContext
from oac.hessian.output_adaptive import OutputAdaptiveHessian
from oac.models import Adapter
from oac.pipeline import catch_block_inputs, propagate, quantize_model
from oac.solvers import get_solver
from oac.solvers.common import HessianError
from tests.helpers import SHARED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")
STORIES = str(SHARED / "models" / "stories260K")


def tiny_llama(seed=0, layers=3, hidden=32, inter=48, vocab=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Adapter(LlamaForCausalLM(cfg).eval(), "llama")


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=16)  # 16 ≠ 32: project_in/out in the path
    return Adapter(OPTForCausalLM(cfg).eval(), "opt")


def ids_for(n, T, vocab=64, seed=1):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def block_context(adapter, ids, k, batch_size=1):
    """The pipeline's context for block k of a full-precision model (inputs propagated through blocks < k)."""
    inps, kw = catch_block_inputs(adapter, ids, "cpu", batch_size=batch_size)
    for m in range(k):
        inps = propagate(adapter.blocks[m], inps, kw, "cpu", batch_size)
    return BlockContext(k=k, block=adapter.blocks[k], inps=inps, block_kwargs=kw, calib_ids=ids, adapter=adapter,
                        device=CPU, batch_size=batch_size)


def block_hessians(adapter, ids, k, batch_size=1, **opts):
    ctx = block_context(adapter, ids, k, batch_size)
    src = OutputAdaptiveHessian(**opts)
    return src.hessians(ctx, adapter.linears(adapter.blocks[k])), src


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def reference_sequence(adapter, ids, k):
    """Σ_i G_iᵀG_i / N with G_i = ∂ℓ_i/∂W from autograd weight gradients, one window at a time."""
    lins = adapter.linears(adapter.blocks[k])
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
    for i in range(ids.shape[0]):
        for m in lins.values():
            m.weight.requires_grad_(True)
        logits = adapter.model(input_ids=ids[i : i + 1]).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[i, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, [m.weight for m in lins.values()])
        for (n, _), G in zip(lins.items(), grads):
            H[n] += G.double().T @ G.double()
    return {n: h / ids.shape[0] for n, h in H.items()}


def output_grads(adapter, ids, k):
    """Per window i: ({name: X [T, d_in]}, {name: δ [T, d_out]}) in float64 for the linears of block k, δ = ∂ℓ/∂E with
    E an additive zero perturbation of each output, ℓ the summed next-token CE of the whole full-precision model."""
    lins = adapter.linears(adapter.blocks[k])
    for i in range(ids.shape[0]):
        X, E = {}, {}

        def hook_for(n):
            def hook(mod, inp, out):
                X[n] = inp[0].detach()[0].double()
                E[n] = torch.zeros_like(out, requires_grad=True)
                return out + E[n]
            return hook

        hs = [m.register_forward_hook(hook_for(n)) for n, m in lins.items()]
        with torch.enable_grad():
            logits = adapter.model(input_ids=ids[i : i + 1]).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[i, 1:], reduction="sum")
            grads = torch.autograd.grad(loss, [E[n] for n in lins])
        for h in hs:
            h.remove()
        yield X, {n: d[0].double() for n, d in zip(lins, grads)}


def reference_token(adapter, ids, k):
    """Σ_i Σ_t ‖δ_it‖² x_it x_itᵀ / N with δ from an additive zero perturbation E of each output (∂ℓ/∂E)."""
    lins = adapter.linears(adapter.blocks[k])
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
    for X, D in output_grads(adapter, ids, k):
        for n, d in D.items():
            for t in range(d.shape[0]):
                H[n] += d[t].square().sum() * torch.outer(X[n][t], X[n][t])
    return {n: h / ids.shape[0] for n, h in H.items()}


# ------------------------------------------------------------------------------------ (a) D.4


@pytest.mark.parametrize("form", ["weight_grad", "token_gram"])
def test_sequence_product_equals_autograd_weight_gradients(form):
    ad, ids = tiny_llama(), ids_for(3, 8)
    H, src = block_hessians(ad, ids, 1, product="sequence", product_form=form)
    ref = reference_sequence(ad, ids, 1)
    for n in ref:
        assert H[n].dtype == torch.float32
        assert rel(H[n], ref[n]) < 1e-5, n
    # parameters are restored to their (frozen) flags, weights untouched, no .grad anywhere
    assert all(p.grad is None for p in ad.model.parameters())
    assert src.stats["block_passes"] == 3 * 2 and src.stats["head_passes"] == 3


def test_token_product_equals_independent_reference():
    ad, ids = tiny_llama(), ids_for(3, 8)
    H, _ = block_hessians(ad, ids, 0, product="token")
    ref = reference_token(ad, ids, 0)
    for n in ref:
        assert rel(H[n], ref[n]) < 1e-5, n
    Hs, _ = block_hessians(ad, ids, 0, product="sequence")
    assert max(rel(Hs[n], H[n]) for n in H) > 1e-2  # cross-token terms matter at T = 8


def test_products_coincide_for_one_token():
    """T = 2: one CE term, only position 0 receives gradient, i.e. effectively T = 1 (D.4)."""
    ad, ids = tiny_llama(), ids_for(4, 2)
    Hs, _ = block_hessians(ad, ids, 1, product="sequence")
    Ht, _ = block_hessians(ad, ids, 1, product="token")
    # k_proj's Ĥ is 0 in exact arithmetic (softmax over one key has no gradient in k): exactly 0 or a rounding
    # residue depending on the CPU's kernels, so a near-zero H is measured against the block's largest H
    largest = max(float(H.double().norm()) for H in Hs.values())
    for n in Hs:
        a, b = Ht[n].double(), Hs[n].double()
        assert float((a - b).norm()) <= 1e-6 * max(float(b.norm()), 1e-6 * largest), n


# ------------------------------------------------------------------------------------ (b)


def test_grad_batch_of_4_equals_4_batches_of_1():
    ad, ids = tiny_llama(), ids_for(8, 8)
    H1, _ = block_hessians(ad, ids, 0, grad_batch_size=1)
    H4, s4 = block_hessians(ad, ids, 0, grad_batch_size=4)  # capture batch 1 < grad batch 4
    for n in H1:
        assert rel(H4[n], H1[n]) < 1e-5, n
    assert s4.stats["batches"] == 2
    H3, _ = block_hessians(ad, ids, 0, batch_size=4, grad_batch_size=3)  # ragged last batch
    for n in H1:
        assert rel(H3[n], H1[n]) < 1e-5, n


# ------------------------------------------------------------------------------------ (c) C3


def _run_pipeline(solver, cfg, ids, opts, seed=0):
    ad = tiny_llama(seed=seed, layers=1)
    solve, _ = get_solver(solver)
    quantize_model(ad, ids, OutputAdaptiveHessian(**opts), solve, cfg, device="cpu")
    return {f"{k}.{n}": m.weight.detach().clone() for k, b in enumerate(ad.blocks) for n, m in ad.linears(b).items()}


@pytest.mark.parametrize("solver", ["spqr", "billm"])
def test_loss_scale_and_reduction_leave_weights_unchanged(solver):
    """Sum vs token-mean CE scales Ĥ by (T−1)⁻² and S = 1024 scales Δ by S (divided out again), C3.

    No tolerance: T − 1 = 16 and S = 1024 are powers of two, so every scaled quantity (Δ, Ĥ, damping,
    Cholesky factors, τ, search errors, quantiles) is scaled exactly in floating point and the quantized
    weights agree bit for bit. (With a non-power-of-two factor, e.g. S = 3, rounding differences of
    ~1e-7 relative appear in Ĥ and could in principle flip a rounding decision of the solver.)
    """
    _, cls = get_solver(solver)
    cfg = cls(wbits=2, groupsize=16) if solver == "spqr" else cls()
    ids = ids_for(4, 17)
    base = _run_pipeline(solver, cfg, ids, {})
    opts = {"loss_reduction": "mean", "loss_scale": 1024.0}  # Ĥ scaled by 1/256 overall
    other = _run_pipeline(solver, cfg, ids, opts)
    for n in base:
        assert torch.equal(other[n], base[n]), (opts, n, rel(other[n], base[n]))
    fp = tiny_llama(seed=0, layers=1)
    assert rel(base["0.mlp.up_proj"], fp.blocks[0].mlp.up_proj.weight) > 1e-3  # it did quantize


# ------------------------------------------------------------------------------------ (d) refresh


class Recording:
    """Wraps a source and keeps a copy of every Ĥ it returns, per block."""

    def __init__(self, src):
        self.src, self.seen = src, {}
        self.supports_groups = False

    def hessians(self, ctx, group):
        H = self.src.hessians(ctx, group)
        self.seen[ctx.k] = {n: h.clone() for n, h in H.items()}
        return H

    def record(self):
        return self.src.record()


def _hessians_after(solver_name, refresh, ids, **kw):
    ad = tiny_llama()
    solve, cls = get_solver(solver_name)
    cfg = cls(wbits=2) if solver_name == "rtn" else cls()
    rec = Recording(OutputAdaptiveHessian(refresh=refresh, **kw))
    quantize_model(ad, ids, rec, solve, cfg, device="cpu")
    return rec.seen, rec.src


def test_refresh_per_block_sees_quantized_predecessors_once_does_not():
    ids = ids_for(4, 8)
    q, _ = _hessians_after("rtn", "per_block", ids)
    f, _ = _hessians_after("identity", "per_block", ids)
    assert all(rel(q[0][n], f[0][n]) == 0 for n in q[0])  # block 0 is solved after its Ĥ
    assert min(rel(q[1][n], f[1][n]) for n in q[1]) > 1e-3
    q, sq = _hessians_after("rtn", "once", ids)
    f, _ = _hessians_after("identity", "once", ids)
    for k in (1, 2):
        assert all(rel(q[k][n], f[k][n]) == 0 for n in q[k])
    assert sq.stats["passes"] == 1 and sq.stats["block_passes"] == 4 * 3
    # every 2: block 1 comes from the pass at block 0 (unchanged), block 2 from a pass at block 2
    q, sq = _hessians_after("rtn", "every", ids, refresh_every=2)
    f, _ = _hessians_after("identity", "every", ids, refresh_every=2)
    assert all(rel(q[1][n], f[1][n]) == 0 for n in q[1])
    assert min(rel(q[2][n], f[2][n]) for n in q[2]) > 1e-3
    assert sq.stats["passes"] == 2 and sq.stats["block_passes"] == 4 * (3 + 1)
    # once equals per_block on the identity solver (the model never changes)
    p, _ = _hessians_after("identity", "per_block", ids)
    o, _ = _hessians_after("identity", "once", ids)
    for k in range(3):
        for n in p[k]:
            assert rel(o[k][n], p[k][n]) < 1e-5


def test_hessian_cache(tmp_path):
    ids = ids_for(4, 8)
    a, s1 = _hessians_after("rtn", "per_block", ids, cache_dir=str(tmp_path))
    assert s1.stats["cache_misses"] == 3 and s1.stats["cache_hits"] == 0
    b, s2 = _hessians_after("rtn", "per_block", ids, cache_dir=str(tmp_path))
    assert s2.stats["cache_hits"] == 3 and s2.stats["block_passes"] == 0
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
    # a reload carries what computing the entries cost: the same passes, and time of the same order
    assert s1.stats["cached_block_passes"] == 0 and s2.stats["cached_block_passes"] == s1.stats["block_passes"] > 0
    assert s2.stats["cached_cost_unknown"] == 0 and s2.stats["cached_head_passes"] == s1.stats["head_passes"]
    assert 0 < s2.stats["cached_time_s"] <= s1.stats["time_total_s"]
    # block 0 quantized differently: only block 0's Ĥ (which precedes any quantization) is reused
    _, s3 = _hessians_after("identity", "per_block", ids, cache_dir=str(tmp_path))
    assert s3.stats["cache_hits"] == 1 and s3.stats["cache_misses"] == 2
    # refresh=once: reused by any solver
    _hessians_after("rtn", "once", ids, cache_dir=str(tmp_path))
    _, s4 = _hessians_after("identity", "once", ids, cache_dir=str(tmp_path))
    assert s4.stats["cache_hits"] == 1 and s4.stats["block_passes"] == 0
    assert s4.stats["cached_block_passes"] == 4 * 3  # 4 windows through blocks 0..2
    # an entry without a recorded cost (from before costs were kept) is counted as unknown, not as free
    for f in tmp_path.glob("oac_hessian/*.cost.json"):
        f.unlink()
    _, s5 = _hessians_after("identity", "once", ids, cache_dir=str(tmp_path))
    assert s5.stats["cache_hits"] == 1 and s5.stats["cached_cost_unknown"] == 1 and s5.stats["cached_time_s"] == 0


# ------------------------------------------------------------------------------------ (e) end-to-end


def test_end_to_end_stories260k_gptq():
    model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ad = Adapter(model, "llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    ids = ids_for(16, 64, vocab=model.config.vocab_size)
    solve, cls = get_solver("gptq")
    src = OutputAdaptiveHessian(grad_batch_size=4)
    state = quantize_model(ad, ids, src, solve, cls(wbits=3), device="cpu", batch_size=4)
    assert len(state.layers) == 5 * 7
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("proj" in n for n in changed)  # only block linears are quantized
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags  # freezing is undone
    K = 5
    assert src.stats["block_passes"] == 16 * sum(K - k for k in range(K))
    with torch.no_grad():
        out = model(input_ids=ids[:2]).logits
    assert torch.isfinite(out).all()


def test_end_to_end_opt():
    ad = tiny_opt()
    w0 = ad.blocks[0].fc1.weight.detach().clone()
    ids = ids_for(4, 8)
    solve, cls = get_solver("gptq")
    src = OutputAdaptiveHessian(product="token", grad_batch_size=2)
    quantize_model(ad, ids, src, solve, cls(wbits=2), device="cpu", batch_size=2)
    assert not torch.equal(ad.blocks[0].fc1.weight, w0)
    assert src.record()["stats"]["passes"] == 2


# ------------------------------------------------------------------------------------ options


def test_fp16_dynamic_loss_scale_recovers_from_overflow():
    ad, ids = tiny_llama(), ids_for(2, 8)
    H32, _ = block_hessians(ad, ids, 1)
    ctx = block_context(ad, ids, 1)
    src = OutputAdaptiveHessian(grad_dtype="fp16", loss_scale="dynamic")
    src._scale = 2.0**22  # Δ·S beyond fp16's 65504: must halve and redo the batch
    H16 = src.hessians(ctx, ad.linears(ad.blocks[1]))
    assert src.stats["overflow_retries"] > 0 and src._scale < 2.0**22
    for n in H32:
        assert rel(H16[n], H32[n]) < 2e-2  # fp16 forward/backward, fp32 products
    assert all(p.dtype == torch.float32 for p in ad.model.parameters())  # cast restored exactly
    with pytest.raises(HessianError, match="non-finite output gradients"):
        OutputAdaptiveHessian(grad_dtype="fp16", loss_scale=2.0**22).hessians(ctx, ad.linears(ad.blocks[1]))


def test_alpha_mixing_and_sampled_labels():
    ad, ids = tiny_llama(), ids_for(3, 8)
    H0, _ = block_hessians(ad, ids, 1)
    Hm, _ = block_hessians(ad, ids, 1, alpha=0.5)
    from oac.hessian.layerwise import LayerwiseHessian

    ctx = block_context(ad, ids, 1)
    Hl = LayerwiseHessian().hessians(ctx, ad.linears(ad.blocks[1]))
    for n in H0:
        c = Hl[n].trace() / H0[n].trace()
        assert rel(Hm[n], c * H0[n] + 0.5 * Hl[n]) < 1e-6
        assert abs(float(Hm[n].trace() / Hl[n].trace()) - 1.5) < 1e-5
    Hs1, _ = block_hessians(ad, ids, 1, labels="sampled", seed=3)
    Hs2, _ = block_hessians(ad, ids, 1, labels="sampled", seed=3)
    assert all(torch.equal(Hs1[n], Hs2[n]) for n in H0)
    assert max(rel(Hs1[n], H0[n]) for n in H0) > 1e-2


def test_bad_options():
    with pytest.raises(ConfigError):
        OutputAdaptiveHessian(product="row")
    with pytest.raises(ConfigError, match=r"method\.oac: unknown option\(s\) \['granularity'\]"):
        from oac import hessian

        hessian.get("output_adaptive").make_options({"oac": {"granularity": "sequence"}})
    with pytest.raises(ConfigError):
        OutputAdaptiveHessian(loss_scale=0)
    with pytest.raises(ConfigError):
        OutputAdaptiveHessian(refresh="every", refresh_every=0)
    rec = OutputAdaptiveHessian(loss_scale="dynamic").record()
    assert rec["product"] == "sequence" and rec["refresh"] == "per_block" and "1/N" in rec["normalisation"]
