"""BiLLM solver (METHODS.md B4, properties D.3, D.5, D.8)."""

import pytest
import torch

from oac.quant.bits import billm_bits
from oac.errors import ConfigError
from oac.solvers.billm import BiLLMConfig, _salient_errors, binarize, check_shape, search, solve
from tests.helpers import correlated_H
from oac.solvers.common import layer_objective



pytestmark = pytest.mark.usefixtures("single_thread")

def rand_W(d_out, d_in, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(d_out, d_in, generator=g) / torch.rand(d_out, d_in, generator=g).clamp(min=0.05).sqrt()


def _bin_row(x, m, order):
    """BIN of one row by the spec's formulas, with Python floats."""
    idx = [i for i in range(len(x)) if m[i]]
    approx = [0.0] * len(x)
    for _ in range(order):
        r = [x[i] - approx[i] for i in idx]
        mu = sum(r) / len(r)
        alpha = sum(abs(v - mu) for v in r) / len(r)
        for i, v in zip(idx, r):
            approx[i] += alpha * ((v - mu > 0) - (v - mu < 0)) + mu
    return approx


def test_bin_closed_form_order_1_and_2():
    x = [0.5, -1.0, 2.0, 0.25, 3.0, -0.75]
    m = [True, True, False, True, True, False]
    # order 1 by hand: μ = (0.5 - 1 + 0.25 + 3)/4 = 0.6875, α = mean |x - μ| = 1.3125
    A1 = binarize(torch.tensor([x]), torch.tensor([m]), 1)[0][0].tolist()
    mu, alpha = 0.6875, (0.1875 + 1.6875 + 0.4375 + 2.3125) / 4
    assert A1 == pytest.approx([mu - alpha, mu - alpha, 0, mu - alpha, mu + alpha, 0])
    assert A1 == pytest.approx(_bin_row(x, m, 1))
    A2 = binarize(torch.tensor([x]), torch.tensor([m]), 2)[0][0].tolist()
    assert A2 == pytest.approx(_bin_row(x, m, 2))
    # a value equal to the row mean gets sign 0, i.e. exactly μ; an empty mask gives zeros
    A = binarize(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, True]]), 1)[0]
    assert A[0, 1] == 2.0
    assert (binarize(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), 2)[0] == 0).all()


def test_bin_levels_per_row():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 64, generator=g)
    M = torch.rand(20, 64, generator=g) < 0.6
    for order, levels in ((1, 2), (2, 4)):
        A = binarize(X, M, order)[0]
        assert (A[~M] == 0).all()
        assert all(len(torch.unique(A[r][M[r]])) <= levels for r in range(20))
    assert torch.allclose(binarize(3.0 * X, M, 2)[0], 3.0 * binarize(X, M, 2)[0], atol=1e-5)  # homogeneous


def brute_force_search(S, X, kmax=49, nq=81):
    """SEARCH evaluated literally with BIN on full masks, one candidate at a time."""
    rows, ncols = X.shape
    cand = torch.argsort(S.abs().sum(0), descending=True, stable=True)
    err_k = []
    for k in range(1, min(kmax, ncols - 1) + 1):
        M = torch.zeros(rows, ncols, dtype=torch.bool)
        M[:, cand[:k]] = True
        err_k.append(float((X - binarize(X, M, 2)[0] - binarize(X, ~M, 2)[0]).square().mean()))
    k = min(range(len(err_k)), key=err_k.__getitem__) + 1
    sal = torch.zeros(rows, ncols, dtype=torch.bool)
    sal[:, cand[:k]] = True
    thr = torch.quantile((X * ~sal).abs().flatten(), torch.linspace(0.1, 0.9, nq))
    err_t = []
    for t in thr:
        sp, co = (X.abs() >= t) & ~sal, (X.abs() < t) & ~sal
        A = binarize(X, co, 1)[0] + binarize(X, sp, 1)[0] + binarize(X, sal, 2)[0]
        err_t.append(float((X - A).square().mean()))
    t = thr[min(range(nq), key=err_t.__getitem__)]
    return k, err_k, (sal, (X.abs() >= t) & ~sal, (X.abs() < t) & ~sal)


def test_salient_search_picks_the_brute_force_minimiser():
    # constructed block: 6 columns with a much larger saliency than the rest, so err_k has a clear minimum
    g = torch.Generator().manual_seed(2)
    W = rand_W(48, 128, seed=3)
    W[:, [5, 17, 40, 77, 90, 121]] *= 8
    u = 0.05 + 0.05 * torch.rand(128, generator=g)
    S = W.square() / u.square()
    k, err_k, masks = brute_force_search(S, S)
    ours = search(S, S)
    assert int(ours[0][0].sum()) == k
    assert sorted(err_k)[1] - err_k[k - 1] > 1e-3 * err_k[k - 1]  # the minimum is not a near-tie
    for a, b in zip(ours, masks):
        assert torch.equal(a, b)
    # the batched (GPU) form of the salient-column errors equals the loop form
    cand = torch.argsort(S.sum(0), descending=True, stable=True)
    torch.testing.assert_close(_salient_errors(S[:, cand], 49, batched=True),
                               _salient_errors(S[:, cand], 49, batched=False), rtol=1e-5, atol=0)  # fmt: skip
    torch.testing.assert_close(_salient_errors(S[:, cand], 49, batched=False), torch.tensor(err_k), rtol=1e-5, atol=0)


@pytest.mark.parametrize("signed", [False, True])
def test_search_equals_brute_force_on_random_blocks(signed):
    # signed=True is search_on="weights": the split (-t, t) is a value interval around zero
    for seed in range(3):
        W = rand_W(24, 64, seed=seed)
        u = 0.05 + 0.05 * torch.rand(64, generator=torch.Generator().manual_seed(seed))
        S = W.square() / u.square()
        X = W if signed else S
        ours = search(S, X)
        ref = brute_force_search(S, X)[2]
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        sal, sp, co = ours
        assert ((sal.int() + sp.int() + co.int()) == 1).all()  # the masks partition the block
        assert (sal == sal[:1]).all()  # salient mask is column-structured


def test_layer_masks_bits_and_stats():
    W, H = rand_W(32, 320), correlated_H(320)  # 2 full blocks and a 64-column block
    res = solve(W, H, BiLLMConfig())
    st, sal = res.stats, res.masks["salient"]
    r = int(sal.sum()) / W.numel()
    assert st["n_salient"] == int(sal.sum()) and st["salient_fraction"] == r and 0 < r < 0.5
    assert st["bits_reported"] == 1 + r and st["bits_nominal"] == 1
    # 3 blocks per row (the last one 64 wide) each store 8 fp16 statistics per row: 128·3/320 bits per weight
    assert st["bits_full"] == pytest.approx(2 + 128 * 3 / 320 + 1 / 32)
    assert (st["bits_reported"], st["bits_full"]) == billm_bits(r, 128, 32, 320)
    assert billm_bits(r, 128, 32, 256) == billm_bits(r, 128, 32)  # B | d_in: the 128/B of METHODS.md B4
    for b0 in range(0, 320, 128):  # per block the salient columns are whole columns, 1..49 of them
        blk = sal[:, b0 : b0 + 128]
        assert (blk == blk[:1]).all() and 1 <= int(blk[0].sum()) <= 49
    assert torch.isfinite(res.weight).all() and st["n_weights"] == W.numel()


def test_scale_invariance():
    W, H = rand_W(32, 256), correlated_H(256)
    for cfg in (BiLLMConfig(), BiLLMConfig(intra_block_feedback=True)):
        a, b = solve(W, H, cfg), solve(W, 1000 * H, cfg)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-6)
        assert torch.equal(a.masks["salient"], b.masks["salient"])


def test_objective_below_plain_sign_binarization():
    W, H = rand_W(64, 256), correlated_H(256)
    mu = W.mean(1, keepdim=True)
    alpha = (W - mu).abs().mean(1, keepdim=True)
    plain = alpha * torch.sign(W - mu) + mu
    base = layer_objective(W, plain, H)
    for cfg in (BiLLMConfig(diagnostics=True), BiLLMConfig(intra_block_feedback=True, diagnostics=True)):
        res = solve(W, H, cfg)
        assert res.stats["objective"] == pytest.approx(layer_objective(W, res.weight, H))
        assert res.stats["objective"] < 0.8 * base
        plain = solve(W, H, BiLLMConfig(intra_block_feedback=cfg.intra_block_feedback))
        assert torch.equal(plain.weight, res.weight) and "objective" not in plain.stats  # opt-in only


def test_intra_block_feedback_levels():
    # masks and statistics are fixed at block start, so each row keeps <= 2+2+4 values per block
    W, H = rand_W(16, 128), correlated_H(128)
    res = solve(W, H, BiLLMConfig(intra_block_feedback=True))
    assert all(len(torch.unique(row)) <= 8 for row in res.weight)


def test_dead_columns():
    W, H = rand_W(16, 128), correlated_H(128)
    dead = torch.tensor([0, 64, 100])
    H[dead, :] = 0
    H[:, dead] = 0
    for cfg in (BiLLMConfig(), BiLLMConfig(intra_block_feedback=True)):
        res = solve(W, H, cfg)
        assert torch.isfinite(res.weight).all() and (res.weight[:, dead] == 0).all() and res.stats["n_dead"] == 3


def nanmean_bin(X, M, order):
    """BIN as the reference writes it: masked entries NaN elsewhere, μ and α by torch.nanmean (Σ / n)."""
    nan = torch.tensor(float("nan"))
    A, stats = torch.zeros_like(X), []
    for _ in range(order):
        R = torch.where(M, X * M - A, nan)
        mu = torch.nanmean(R, dim=-1, keepdim=True).nan_to_num(0.0)
        D = R - mu
        alpha = torch.nanmean(D.abs(), dim=-1, keepdim=True).nan_to_num(0.0)
        A = A + torch.where(M, alpha * torch.sign(D) + mu, 0.0)
        stats.append((mu, alpha))
    return A, stats


@pytest.mark.parametrize("order", [1, 2])
def test_bin_statistics_are_sum_over_n_bit_for_bit(order):
    """μ and α are Σ/n (the reference's nanmean), not Σ·(1/n): equal bit for bit, an empty row gives 0."""
    n_recip_differs = 0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        X = rand_W(48, 128, seed=seed)
        M = torch.rand(48, 128, generator=g) < 0.3
        M[7] = False  # empty mask row
        A, st = binarize(X, M, order)
        A_ref, st_ref = nanmean_bin(X, M, order)
        assert torch.equal(A, A_ref)
        for (mu, al), (mu_r, al_r) in zip(st, st_ref):
            assert torch.equal(mu, mu_r) and torch.equal(al, al_r)
        assert (A[7] == 0).all()
        n = M.sum(-1, keepdim=True).float().clamp(min=1)
        s1 = (X * M).sum(-1, keepdim=True)
        n_recip_differs += int(not torch.equal(s1 * (1.0 / n), s1 / n))
    assert n_recip_differs > 0  # the former Σ·(1/n) is distinguishable on these inputs


def test_check_shape_accepts_any_shape():
    for d_out, d_in in ((576, 576), (192, 576), (576, 1536), (7, 30), (4096, 11008)):
        check_shape(BiLLMConfig(), d_out, d_in)
    with pytest.raises(ConfigError) as exc:
        check_shape(BiLLMConfig(salient_metric="x"), 576, 576)
    assert "\n" not in str(exc.value) and "salient_metric must be one of ['hessian', 'magnitude']" in str(exc.value)


def test_short_and_narrow_blocks():
    """A 576-wide layer (4 blocks of 128 and one of 64) and a block narrower than 50 columns both work."""
    for d_in in (576, 158):
        W, H = rand_W(16, d_in), correlated_H(d_in)
        res = solve(W, H, BiLLMConfig())
        assert torch.isfinite(res.weight).all()
        n_b = -(-d_in // 128)
        assert res.stats["bits_full"] == pytest.approx(2 + 128 * n_b / d_in + 1 / 16)
