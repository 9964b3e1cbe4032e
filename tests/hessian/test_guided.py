"""hessian=guided: GuidedQuant's grouped Fisher Hessians from OAC's gradient pass (oac/hessian/guided.py)."""

import pytest
import torch
from omegaconf import OmegaConf

from oac import hessian, method
from oac.errors import ConfigError
from oac.hessian.guided import GuidedHessian
from oac.hessian.output_adaptive import OutputAdaptiveHessian
from oac.models import Adapter
from oac.pipeline import quantize_model
from oac.solvers import get_solver
from tests.hessian.test_output_adaptive import Recording, block_context, ids_for, output_grads, rel
from tests.helpers import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def model(seed=0):
    """tests.helpers.tiny_llama: hidden 32, MLP 64, k/v 16 wide, 3 blocks, vocabulary 96."""
    return Adapter(tiny_llama(seed), "llama")


def brute_force(adapter, ids, k, G):
    """GuidedQuant's definition token by token, in float64: H_g = (1/N) Σ_n mean_{c∈g}(δ_nc²) x_n x_nᵀ, with δ
    from an additive zero perturbation of every output (∂ℓ/∂E), the whole full-precision model, one window at a time."""
    lins = adapter.linears(adapter.blocks[k])
    H = {n: torch.zeros(G, m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
    for X, D in output_grads(adapter, ids, k):
        for n, d in D.items():  # [T, d_out]
            width = d.shape[1] // G
            for t in range(d.shape[0]):
                xx = torch.outer(X[n][t], X[n][t])
                for g in range(G):
                    s = d[t, g * width : (g + 1) * width].square().mean()
                    H[n][g] += s * xx
    return {n: h / ids.shape[0] for n, h in H.items()}


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("k", [0, 2])
def test_grouped_hessians_equal_the_per_token_definition(G, k):
    ad, ids = model(), ids_for(3, 8, vocab=96)
    src = GuidedHessian(groups=G, refresh="per_block")  # per_block on the FP model = the FP pass at block k
    H = src.hessians(block_context(ad, ids, k), ad.linears(ad.blocks[k]))
    ref = brute_force(ad, ids, k, G)
    for n, m in ad.linears(ad.blocks[k]).items():
        got = H[n] if G > 1 else H[n][None]
        assert H[n].shape == ((m.in_features,) * 2 if G == 1 else (G, m.in_features, m.in_features))
        assert H[n].dtype == torch.float32
        # the source sums δ² over the group's channels: d_out/G times GuidedQuant's mean (a constant, C3)
        assert rel(got / (m.out_features // G), ref[n]) < 1e-5, n
        if G > 1:  # the groups really differ (their outputs matter differently to the loss)
            assert min(rel(got[0] * c, got[1]) for c in (1.0, float(got[1].trace() / got[0].trace()))) > 1e-2, n
    assert all(p.grad is None for p in ad.model.parameters())


def test_groups_partition_the_token_fisher():
    ad, ids = model(), ids_for(3, 8, vocab=96)
    ctx = block_context(ad, ids, 1)
    H1 = GuidedHessian(groups=1, refresh="per_block").hessians(ctx, ad.linears(ad.blocks[1]))
    H4 = GuidedHessian(groups=4, refresh="per_block").hessians(ctx, ad.linears(ad.blocks[1]))
    for n in H1:
        assert rel(H4[n].sum(0), H1[n]) < 1e-6, n


def _quantize(src, solver="gptq", **cfg):
    ad = model()
    solve, cls = get_solver(solver)
    rec = Recording(src)
    state = quantize_model(ad, ids_for(4, 9, vocab=96), rec, solve, cls(**cfg), device="cpu")
    weights = {n: p.detach().clone() for n, p in ad.model.named_parameters()}
    return rec.seen, weights, state


@pytest.mark.parametrize("refresh", ["once", "per_block"])
def test_one_group_is_oac_token_product_bit_for_bit(refresh):
    """G = 1 is OAC's product=token (the issue's equivalence: with refresh=once, GuidedQuant with one group).

    The source sums δ² over the group, so H is OAC's Ĥ exactly and GPTQ's weights agree bit for bit; with
    GuidedQuant's channel mean, H is 1/d_out of it and the weights are the same by C3 (exactly for d_out a power
    of 4, here the 16- and 64-wide outputs)."""
    H_oac, W_oac, _ = _quantize(OutputAdaptiveHessian(product="token", refresh=refresh), wbits=2, act_order=True)
    H_g, W_g, _ = _quantize(GuidedHessian(groups=1, refresh=refresh), wbits=2, act_order=True)
    assert all(torch.equal(H_g[k][n], H_oac[k][n]) for k in H_oac for n in H_oac[k])
    assert all(torch.equal(W_g[n], W_oac[n]) for n in W_oac)
    fp = model()
    assert rel(W_g["model.layers.0.mlp.up_proj.weight"], fp.model.model.layers[0].mlp.up_proj.weight) > 1e-3
    # GuidedQuant's normalisation (channel mean) on the same weights: C3 scale invariance
    solve, cls = get_solver("gptq")
    cfg = cls(wbits=2, act_order=True)
    for n, lin in fp.linears(fp.blocks[1]).items():
        d_out = lin.out_features
        if d_out in (16, 64):
            W = lin.weight.detach()
            assert torch.equal(solve(W, H_oac[1][n] / d_out, cfg).weight, solve(W, H_oac[1][n], cfg).weight), n


def test_grouped_pipeline_gptq_and_spqr():
    H, W, state = _quantize(GuidedHessian(groups=2), wbits=3)
    assert all(h.shape[0] == 2 and h.dim() == 3 for hs in H.values() for h in hs.values())
    assert all(r["row_groups"] == 2 for r in state.layers)
    assert all(torch.isfinite(w).all() for w in W.values())
    _, W1, _ = _quantize(GuidedHessian(groups=1), wbits=3)
    assert rel(W["model.layers.1.self_attn.q_proj.weight"], W1["model.layers.1.self_attn.q_proj.weight"]) > 0
    _, Ws, st = _quantize(GuidedHessian(groups=4), "spqr", wbits=2, groupsize=16, qq_groupsize=4)
    assert all(r["row_groups"] == 4 and 0 <= r["outlier_fraction"] < 0.2 for r in st.layers)


def test_record_states_groups_normalisation_and_memory():
    _, _, _ = _quantize(src := GuidedHessian(groups=4, refresh="once"), wbits=3)
    rec = src.record()
    assert rec["hessian"] == "guided" and rec["groups"] == 4 and rec["refresh"] == "once"
    assert "d_out/G" in rec["normalisation"] and "H[g]" in rec["row_rule"]
    mem = rec["memory"]
    assert mem["per_linear"]["mlp.down_proj"] == {"shape": [4, 64, 64], "bytes": 4 * 64 * 64 * 4}
    assert mem["per_linear"]["self_attn.q_proj"]["bytes"] == 4 * 32 * 32 * 4
    block = 4 * 4 * (6 * 32 * 32 + 64 * 64)  # q k v o gate up (d_in 32) + down (d_in 64), G = 4
    assert mem["block_max_bytes"] == block and mem["pass_peak_bytes"] == 3 * block  # once: all 3 blocks at once
    assert rec["stats"]["passes"] == 1


def test_cache_entries_never_collide_with_oac(tmp_path):
    cache = str(tmp_path)
    H_oac, _, _ = _quantize(s_oac := OutputAdaptiveHessian(product="token", refresh="once", cache_dir=cache), wbits=3)
    _, _, _ = _quantize(s1 := GuidedHessian(groups=1, cache_dir=cache), wbits=3)
    assert s_oac.stats["cache_misses"] == 1 and s1.stats["cache_misses"] == 1 and s1.stats["cache_hits"] == 0
    _, _, _ = _quantize(s2 := GuidedHessian(groups=2, cache_dir=cache), wbits=3)
    assert s2.stats["cache_misses"] == 1  # G is in the key
    H_again, _, _ = _quantize(s3 := GuidedHessian(groups=2, cache_dir=cache), wbits=3)
    assert s3.stats["cache_hits"] == 1 and s3.stats["block_passes"] == 0
    assert all(h.dim() == 3 for hs in H_again.values() for h in hs.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guided_hessian", "oac_hessian"]
    assert len(list((tmp_path / "guided_hessian").glob("*.pt"))) == 2 * 3


def test_options_and_validation():
    with pytest.raises(ConfigError, match=r"method\.guided\.groups must be an integer >= 1, got 0"):
        GuidedHessian(groups=0)
    with pytest.raises(ConfigError, match=r"method\.guided: unknown option\(s\) \['product'\]"):
        hessian.get("guided").make_options({"guided": {"product": "token"}})
    with pytest.raises(ConfigError, match=r"method\.guided\.refresh must be one of"):
        GuidedHessian(refresh="sometimes")
    with pytest.raises(ConfigError, match="true_sequential=true does not apply"):
        method.resolve({"name": "g", "solver": "gptq", "hessian": "guided", "true_sequential": True})
    ad, ids = model(), ids_for(2, 8, vocab=96)
    with pytest.raises(ConfigError, match=r"method\.guided\.groups=3 does not divide d_out=(16|32|64)"):
        GuidedHessian(groups=3).hessians(block_context(ad, ids, 0), ad.linears(ad.blocks[0]))


def test_configs_pair_guided_with_its_layerwise_backbone(compose):
    from oac.rows import pair_key

    assert "guided" in method.source_keys() and hessian.is_variant("guided")
    g = OmegaConf.to_container(compose("method=guided_spqr", "method.guided.groups=4"), resolve=True)
    b = OmegaConf.to_container(compose("method=spqr"), resolve=True)
    o = OmegaConf.to_container(compose("method=oac_spqr"), resolve=True)
    assert g["method"]["name"] == "guided_spqr" and g["method"]["backbone"] == "spqr"
    assert g["method"]["guided"]["groups"] == 4 and "oac" not in g["method"]
    assert pair_key(g) == pair_key(b) == pair_key(o)
    m = method.resolve(g["method"])
    assert m.row_groups == 4 and m.source.name == "guided"
    assert compose("solver=spqr", "hessian=guided").method == compose("method=guided_spqr").method


def test_split_pass_and_disk_pending_are_exact(tmp_path):
    """max_pass_gb splits the once pass (here one block per pass) and a cache keeps the later blocks on disk
    only: both give the same Hessians and weights, bit for bit, as one pass held in memory."""
    H, W, _ = _quantize(one := GuidedHessian(groups=2), wbits=3)
    block = 2 * 4 * (6 * 32 * 32 + 64 * 64)
    Hs, Ws, _ = _quantize(split := GuidedHessian(groups=2, max_pass_gb=1.5 * block / 2**30), wbits=3)
    assert one.stats["passes"] == 1 and split.stats["passes"] == 3
    assert split.record()["memory"]["pass_peak_bytes"] == block and split.record()["max_pass_gb"] > 0
    ctx_src = GuidedHessian(groups=2, cache_dir=str(tmp_path))
    Hc, Wc, _ = _quantize(ctx_src, wbits=3)
    for other, weights in ((Hs, Ws), (Hc, Wc)):
        assert all(torch.equal(other[k][n], H[k][n]) for k in H for n in H[k])
        assert all(torch.equal(weights[n], W[n]) for n in W)
    with pytest.raises(ConfigError, match=r"method\.guided\.max_pass_gb must be a number in \(0"):
        GuidedHessian(max_pass_gb=0)


def test_oac_once_with_a_cache_reads_later_blocks_back_from_disk(tmp_path):
    H, W, _ = _quantize(OutputAdaptiveHessian(refresh="once"), wbits=3)
    src = OutputAdaptiveHessian(refresh="once", cache_dir=str(tmp_path))
    ad, ids = model(), ids_for(4, 9, vocab=96)
    ctx = block_context(ad, ids, 0)
    src.hessians(ctx, ad.linears(ad.blocks[0]))
    assert sorted(src._pending) == [1, 2] and all(isinstance(v, str) for v in src._pending.values())
    Hc, Wc, _ = _quantize(OutputAdaptiveHessian(refresh="once", cache_dir=str(tmp_path)), wbits=3)
    assert all(torch.equal(Hc[k][n], H[k][n]) for k in H for n in H[k])
    assert all(torch.equal(Wc[n], W[n]) for n in W)


def test_stories260k_jobs_pair_guided_with_gptq_in_the_report(compose, tmp_path):
    """End to end: hessian=guided with G = 2 through run_job (result.json records G and the bytes), paired with
    the layer-wise GPTQ job by the report, its label naming the groups."""
    import pandas as pd

    from experiments.report import report
    from oac.job import run_job

    tiny = ["model=stories260k", "calib.nsamples=4", "calib.seqlen=32", "eval.ppl.datasets=[wikitext2]",
            "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "checkpoint=false", "tag=guided_table", "method.wbits=3"]
    out = tmp_path / "outputs"
    for name, ov in {"gptq": ["method=gptq"], "g1": ["method=guided_gptq"],
                     "g2": ["method=guided_gptq", "method.guided.groups=2"]}.items():
        r = run_job(compose(*tiny, *ov), out / name, overrides=[*tiny, *ov])
        assert r["status"] == "complete", r.get("error")
    assert r["hessian"]["groups"] == 2 and r["hessian"]["memory"]["per_linear"]["mlp.down_proj"]["shape"] == [2, 172, 172]
    assert all(layer["row_groups"] == 2 for layer in r["layers"])
    report(out, tmp_path / "results")
    pairs = pd.read_csv(tmp_path / "results" / "guided_table_paired.csv")
    rows = pairs[pairs["metric"] == "ppl:wikitext2"]
    assert set(rows["backbone"]) == {"gptq"} and len(rows) == 2
    assert any("groups=2" in lab for lab in rows["label"]) and any("groups=1" in lab for lab in rows["label"])
