"""Per-row-group Hessians H [G, d_in, d_in] (oac.solvers.common.solve_row_groups; the guided source feeds them).

Rule: rows [g·d_out/G, (g+1)·d_out/G) of W are solved with H[g]. G = 1 must be today's path bit for bit; G > 1
must equal solving each row slice separately with its own H, and the stats must describe the whole layer.
"""

import pytest
import torch

from oac import method
from oac.errors import ConfigError
from oac.solvers import billm, gptq, spqr
from oac.solvers.common import HessianError, check_finite, merge_stats, row_slices
from tests.helpers import correlated_H

pytestmark = pytest.mark.usefixtures("single_thread")


def heavy_W(d_out, d_in, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(d_out, d_in, generator=g) / torch.rand(d_out, d_in, generator=g).clamp(min=0.05).sqrt()


def stack(d_in, G, dead=()):
    H = torch.stack([correlated_H(d_in, seed=10 + g) for g in range(G)])
    for c in dead:
        H[:, c, :] = 0.0
        H[:, :, c] = 0.0
    return H


def same_result(a, b):
    assert torch.equal(a.weight, b.weight)
    untimed = lambda st: {k: v for k, v in st.items() if not k.endswith("_s")}  # noqa: E731 (wall times differ)
    assert untimed(a.stats) == untimed(b.stats)
    assert set(a.masks) == set(b.masks) and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


SOLVERS = {
    "gptq": (gptq.solve, [gptq.GPTQConfig(wbits=3), gptq.GPTQConfig(wbits=2, groupsize=32, act_order=True),
                          gptq.GPTQConfig(wbits=3, groupsize=48, static_groups=True, act_order=True)]),
    "spqr": (spqr.solve, [spqr.SpQRConfig(wbits=2, groupsize=16, qq_groupsize=8, blocksize=32),
                          spqr.SpQRConfig(wbits=2, groupsize=16, qq_groupsize=8, target_outlier_fraction=0.02)]),
    "billm": (billm.solve, [billm.BiLLMConfig(blocksize=32)]),
}
CASES = [(name, i) for name, (_, cfgs) in SOLVERS.items() for i in range(len(cfgs))]


@pytest.mark.parametrize("name,i", CASES)
def test_a_stack_of_one_is_the_plain_hessian_bit_for_bit(name, i):
    solve, cfgs = SOLVERS[name]
    W, H = heavy_W(32, 96), stack(96, 1, dead=(5,))
    same_result(solve(W, H, cfgs[i]), solve(W, H[0], cfgs[i]))


@pytest.mark.parametrize("name,i", [c for c in CASES if c[0] != "billm"])
@pytest.mark.parametrize("G", [2, 4])
def test_row_groups_equal_separate_solves_with_their_own_hessian(name, i, G):
    solve, cfgs = SOLVERS[name]
    cfg = cfgs[i]
    W, H = heavy_W(32, 96), stack(96, G, dead=(7,))
    res = solve(W, H, cfg)
    parts = [solve(W[rows], H[g], cfg) for g, rows in enumerate(row_slices(32, G))]
    assert torch.equal(res.weight, torch.cat([p.weight for p in parts]))
    # row-indexed masks stack in row order; the act-order permutation is one row per group
    for k, v in res.masks.items():
        ref = torch.stack if k == "perm" else torch.cat
        assert torch.equal(v, ref([p.masks[k] for p in parts], dim=0)), k
    if getattr(cfg, "act_order", False):  # each group sorts by its own diag(H_g)
        assert res.masks["perm"].shape == (G, 96)
        assert not all(torch.equal(res.masks["perm"][0], res.masks["perm"][g]) for g in range(1, G))
    s = res.stats
    assert s["row_groups"] == G and s["n_weights"] == W.numel()
    assert s["objective"] == pytest.approx(sum(p.stats["objective"] for p in parts), rel=1e-12)
    assert s["n_dead"] == 1 and s["damp_retries"] == sum(p.stats["damp_retries"] for p in parts)
    assert s["bits_nominal"] == cfg.wbits
    if name == "spqr":
        assert s["n_outliers"] == int(res.masks["outliers"].sum()) == sum(p.stats["n_outliers"] for p in parts)
        assert s["outlier_fraction"] == s["n_outliers"] / W.numel()
        assert s["bits_reported"] == pytest.approx(spqr.spqr_bits(2, 16, 8, s["outlier_fraction"]), rel=1e-12)
        if cfg.target_outlier_fraction:  # each group searches its own threshold; the layer hits if all do
            assert s["target_hit"] == all(p.stats["target_hit"] for p in parts)
            if s["target_hit"]:
                assert abs(s["outlier_fraction"] / 0.02 - 1) <= cfg.target_rel_tol
    # the groups' Hessians differ, so the result differs from one shared H
    assert not torch.equal(res.weight, solve(W, H[0], cfg).weight)


def test_scale_of_each_group_is_irrelevant():
    """C3 per group: multiplying H_g by its own constant changes no row of Ŵ (powers of 4: exact)."""
    W, H = heavy_W(32, 96), stack(96, 2)
    scaled = H * torch.tensor([1 / 16, 64.0])[:, None, None]
    for solve, cfg in [(gptq.solve, gptq.GPTQConfig(wbits=2, act_order=True)),
                       (spqr.solve, spqr.SpQRConfig(wbits=2, groupsize=16, qq_groupsize=8))]:
        assert torch.equal(solve(W, H, cfg).weight, solve(W, scaled, cfg).weight)


def test_billm_refuses_row_groups_in_one_line():
    W, H = heavy_W(32, 96), stack(96, 2)
    with pytest.raises(HessianError, match="BiLLM takes one Hessian per layer, got 2 row-group Hessians"):
        billm.solve(W, H, billm.BiLLMConfig())
    with pytest.raises(ConfigError, match=r"method\.guided\.groups=2 needs a solver that takes one Hessian per row "
                                          r"group; 'billm' takes one per layer \(BiLLM chooses its salient columns"):
        method.resolve({"name": "guided_billm", "solver": "billm", "hessian": "guided", "guided": {"groups": 2}})
    method.resolve({"name": "guided_billm", "solver": "billm", "hessian": "guided", "guided": {"groups": 1}})


def test_shapes_are_checked():
    W = heavy_W(30, 96)
    with pytest.raises(HessianError, match=r"a stack \[G, d_in, d_in\] needs G to divide d_out"):
        check_finite(W, stack(96, 4))
    with pytest.raises(HessianError, match="does not match weight"):
        check_finite(W, stack(64, 2))
    check_finite(W, stack(96, 3))
    m = method.resolve({"name": "guided_spqr", "solver": "spqr", "hessian": "guided", "guided": {"groups": 4},
                        "wbits": 2, "groupsize": 16, "qq_groupsize": 16})
    assert m.row_groups == 4
    with pytest.raises(ConfigError, match=r"method\.guided\.groups=4 does not divide d_out=30"):
        m.check_shape(30, 96)
    with pytest.raises(ConfigError, match="qq_groupsize=16 does not divide d_out=8"):  # the 32/4-row slices
        m.check_shape(32, 96)
    m.check_shape(64, 96)


def test_merge_rules():
    a = {"n_weights": 10, "loss": 1.0, "percdamp_used": 0.01, "wbits": 2}
    b = {"n_weights": 10, "loss": 2.0, "percdamp_used": 0.02, "wbits": 2}
    out = merge_stats([a, b], gptq.ROW_GROUP_STATS)
    assert out == {"n_weights": 20, "loss": 3.0, "percdamp_used": 0.02, "wbits": 2}
    with pytest.raises(ValueError, match="disagree"):
        merge_stats([a, dict(b, wbits=3)], gptq.ROW_GROUP_STATS)
