"""GPTQ (METHODS.md B2, A3, A4; properties of Part D)."""

import pytest
import torch

from oac.errors import ConfigError
from oac.quant.grid import fake_quantize, fit_minmax, maxq_for
from oac.solvers import gptq, rtn
from oac.solvers.common import HessianError, layer_objective
from oac.solvers.gptq import GPTQConfig


def make_problem(d_out=64, d_in=256, n=512, seed=0, dead=()):
    """Random W and H = 2 XᵀX / n from correlated X (shared low-rank factors, distinct feature scales)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    F = torch.randn(n, 8, generator=g)
    mix = 2.0 * torch.randn(8, d_in, generator=g)
    col = torch.exp(0.5 * torch.randn(d_in, generator=g))  # distinct diag(H): no ties for act_order
    X = (torch.randn(n, d_in, generator=g) + F @ mix) * col
    X[:, list(dead)] = 0.0
    return W, 2 * X.T @ X / n


def ref_obs(W, H, wbits, groupsize=-1, blocksize=128, act_order=False, static_groups=False, percdamp=0.01,
            mode="U"):
    """Plain column-by-column OBS quantization, no lazy blocks.

    mode "U": error feedback through the upper Cholesky factor U of H⁻¹ (row j of U).
    mode "inv": the textbook OBS update with the explicit inverse of the remaining sub-Hessian H[j:, j:],
    recomputed for every column.
    The group-fit staleness of the reference is replicated with a snapshot of W taken at every block start.
    """
    W, H = W.clone(), H.clone()
    d_in, maxq = W.shape[1], maxq_for(wbits)
    if groupsize == -1:
        s, z = fit_minmax(W, wbits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [fit_minmax(W[:, i : i + groupsize], wbits) for i in range(0, d_in, groupsize)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d_in)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + percdamp * torch.diag(H).mean() * torch.eye(d_in, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(d_in):
        if j % blocksize == 0:
            snapshot = W.clone()  # what the blocked solver's global W holds during this block
        if static_groups:
            s, z = groups[int(perm[j]) // groupsize]
        elif groupsize != -1 and j % groupsize == 0:
            s, z = fit_minmax(snapshot[:, j : j + groupsize], wbits)
        w = W[:, j : j + 1]
        q = fake_quantize(w, s, z, maxq)
        if mode == "U":
            W[:, j:] -= (w - q) / U[j, j] * U[j : j + 1, j:]
        else:
            Hinv = torch.linalg.inv(H[j:, j:])
            W[:, j:] -= (w - q) / Hinv[0, 0] * Hinv[0:1, :]
        Q[:, j : j + 1] = q
    return Q[:, torch.argsort(perm)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def assert_same(a, b, tol=1e-5):
    """Equal to `tol` relative, row by row, allowing one diverging row.

    Rows are independent in GPTQ; fp32 summation order (blocked vs plain, B=32 vs 128, H vs 1000·H) can
    flip one rounding tie, which changes that row's later columns only. A real bug breaks every row.
    """
    per_row = (a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-12)
    bad = int((per_row > tol).sum())
    assert bad <= 1, f"{bad} of {a.shape[0]} rows differ; worst relative error {float(per_row.max()):.3g}"


CASES = [
    dict(),  # per-channel
    dict(blocksize=96),  # short last block
    dict(act_order=True),
    dict(groupsize=128),  # g = B: fits on current weights
    dict(groupsize=128, blocksize=64),  # g multiple of B
    dict(groupsize=32),  # g < B: stale group fits
    dict(groupsize=64, act_order=True),
    dict(groupsize=32, act_order=True, static_groups=True),
    dict(groupsize=64, static_groups=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "channel")
def test_blocked_equals_columnwise_reference(kw):
    W, H = make_problem()
    res = gptq.solve(W, H, GPTQConfig(wbits=3, **kw))
    Q = ref_obs(W, H, 3, **kw)
    assert_same(res.weight, Q)
    assert res.stats["damp_retries"] == 0 and res.stats["percdamp_used"] == 0.01


@pytest.mark.parametrize("kw", [dict(), dict(groupsize=16, blocksize=32, act_order=True)])
def test_cholesky_update_equals_textbook_obs(kw):
    """In float64 the U-row update is exactly OBS with the inverse of the remaining sub-Hessian."""
    W, H = make_problem(d_out=32, d_in=64, n=128)
    a = ref_obs(W.double(), H.double(), 3, mode="U", **kw)
    b = ref_obs(W.double(), H.double(), 3, mode="inv", **kw)
    assert rel(a, b) < 1e-10


def test_loss_is_damped_objective():
    """½ Σ e² equals ½ tr(ΔW H_damped ΔWᵀ) (LDL identity of the OBS sweep)."""
    W, H = make_problem()
    res = gptq.solve(W, H, GPTQConfig(wbits=3, diagnostics=True))
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0])
    assert res.stats["loss"] == pytest.approx(0.5 * layer_objective(W, res.weight, Hd), rel=1e-4)
    assert res.stats["objective"] == pytest.approx(layer_objective(W, res.weight, H), rel=1e-6)


def plain_objective(W, Q, H):
    """tr(ΔW H ΔWᵀ) written out, in float64."""
    D = (W - Q).double()
    return float(torch.trace(D @ H.double() @ D.T))


@pytest.mark.parametrize("kw", [dict(), dict(groupsize=64, act_order=True), dict(groupsize=32, static_groups=True),
                                dict(groupsize=100, act_order=True)])
def test_cheap_objective_equals_plain_formula(kw):
    """Without diagnostics the objective is ‖E‖² − λ‖ΔW‖² from the sweep (no d_in² product): it equals the
    plain formula up to float32 rounding of the weight updates; diagnostics change no weight."""
    W, H = make_problem(dead=[7, 130])
    cheap = gptq.solve(W, H, GPTQConfig(wbits=3, **kw))
    exact = gptq.solve(W, H, GPTQConfig(wbits=3, diagnostics=True, **kw))
    assert torch.equal(cheap.weight, exact.weight)
    ref = plain_objective(W, cheap.weight, H)
    assert cheap.stats["objective"] == pytest.approx(ref, rel=1e-4)
    assert exact.stats["objective"] == pytest.approx(ref, rel=1e-5)
    assert cheap.stats["loss"] == exact.stats["loss"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn(bits):
    W, H = make_problem()
    g = gptq.solve(W, H, GPTQConfig(wbits=bits)).stats["objective"]
    r = rtn.solve(W, H, rtn.RTNConfig(wbits=bits)).stats["objective"]
    assert g < 0.8 * r


@pytest.mark.parametrize("kw", [dict(), dict(groupsize=128), dict(act_order=True), dict(groupsize=128, act_order=True)])
def test_blocksize_invariance(kw):
    W, H = make_problem()
    a = gptq.solve(W, H, GPTQConfig(blocksize=32, **kw)).weight
    b = gptq.solve(W, H, GPTQConfig(blocksize=128, **kw)).weight
    assert_same(a, b)


def test_blocksize_matters_for_small_groups():
    """g < B: non-static group fits read stale weights (B2 quirk), so B changes the result."""
    W, H = make_problem()
    a = gptq.solve(W, H, GPTQConfig(groupsize=32, blocksize=32)).weight
    b = gptq.solve(W, H, GPTQConfig(groupsize=32, blocksize=128)).weight
    assert rel(a, b) > 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(act_order=True, groupsize=64)])
def test_scale_invariance(kw):
    W, H = make_problem()
    a = gptq.solve(W, H, GPTQConfig(**kw))
    b = gptq.solve(W, 1000 * H, GPTQConfig(**kw))
    assert_same(a.weight, b.weight)
    # the weights are exactly scale-invariant; the fp32 loss accumulator only up to the fp32 Cholesky's rounding,
    # which depends on the CPU's kernels (act-order g64: 3.6e-4 relative on Intel Xeon AVX512, < 1e-4 on AMD EPYC)
    assert b.stats["loss"] == pytest.approx(1000 * a.stats["loss"], rel=1e-3)


@pytest.mark.parametrize("kw", [dict(), dict(act_order=True), dict(groupsize=32), dict(groupsize=32, static_groups=True)])
def test_dead_columns(kw):
    dead = [3, 50, 200]
    W, H = make_problem(dead=dead)
    res = gptq.solve(W, H, GPTQConfig(diagnostics=True, **kw))
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, dead] == 0).all()
    assert res.stats["n_dead"] == 3
    assert res.stats["objective"] == pytest.approx(layer_objective(W, res.weight, H), rel=1e-6)
    cheap = gptq.solve(W, H, GPTQConfig(**kw)).stats["objective"]
    assert cheap == pytest.approx(res.stats["objective"], rel=1e-4)
    alive = [c for c in range(256) if c not in dead]
    assert (res.weight[:, alive] != 0).any(dim=0).all()


def _indefinite(neg=3e-3):
    """Correlated H with its smallest eigenvalue pushed to -neg·mean(diag H) (no dead columns)."""
    W, H = make_problem(d_out=32, d_in=64, n=256)
    ev, V = torch.linalg.eigh(H.double())
    v = V[:, :1]
    H = (H.double() - (ev[0] + neg * torch.diag(H).mean()) * v @ v.T).float()
    return W, H


@pytest.mark.parametrize("mode", ["add", "multiply"])
def test_damping_retry(mode):
    W, H = _indefinite()
    assert torch.linalg.cholesky_ex(H).info != 0  # fails undamped
    res = gptq.solve(W, H, GPTQConfig(percdamp=0.0, damp_retry_mode=mode))
    assert res.stats["damp_retries"] >= 1
    assert res.stats["percdamp_used"] == pytest.approx(0.01)
    assert torch.isfinite(res.weight).all()
    direct = gptq.solve(W, H, GPTQConfig(percdamp=res.stats["percdamp_used"]))
    assert torch.equal(res.weight, direct.weight) and direct.stats["damp_retries"] == 0


def test_damping_gives_up():
    W, H = _indefinite(neg=5.0)
    with pytest.raises(HessianError, match="not positive definite"):
        gptq.solve(W, H, GPTQConfig(percdamp=0.0, damp_retry_mode="multiply", max_percdamp=1.0))


def test_non_finite_inputs():
    W, H = make_problem(d_out=8, d_in=32, n=64)
    Hbad = H.clone()
    Hbad[3, 5] = float("nan")
    with pytest.raises(HessianError, match="Hessian contains NaN/Inf"):
        gptq.solve(W, Hbad, GPTQConfig())
    Wbad = W.clone()
    Wbad[0, 0] = float("inf")
    with pytest.raises(HessianError, match="weight contains NaN/Inf"):
        gptq.solve(Wbad, H, GPTQConfig())
    with pytest.raises(HessianError, match="shape"):
        gptq.solve(W, H[:16, :16], GPTQConfig())


@pytest.mark.parametrize("kw", [dict(wbits=0), dict(wbits=9), dict(groupsize=0), dict(groupsize=-3), dict(blocksize=0),
                                dict(static_groups=True), dict(damp_retry_mode="double")])
def test_rejects_bad_config(kw):
    W, H = make_problem(d_out=8, d_in=32, n=64)
    with pytest.raises(ConfigError):
        gptq.solve(W, H, GPTQConfig(**kw))
    with pytest.raises(ConfigError) as exc:  # the job's early check, before calibration
        gptq.check_shape(GPTQConfig(**kw), 8, 32)
    assert "\n" not in str(exc.value)


def test_check_shape_accepts_any_d_in():
    for g in (-1, 24, 128, 1000):
        gptq.check_shape(GPTQConfig(groupsize=g, act_order=True), 576, 576)
        gptq.check_shape(GPTQConfig(groupsize=g, static_groups=g != -1), 192, 1536)


def test_stats_and_masks():
    W, H = make_problem(d_out=16, d_in=64, n=128, dead=[5])
    W0, H0 = W.clone(), H.clone()
    res = gptq.solve(W, H, GPTQConfig(wbits=3, groupsize=16, act_order=True))
    assert torch.equal(W, W0) and torch.equal(H, H0)  # inputs untouched
    st = res.stats
    assert st["bits_nominal"] == 3 and st["bits_reported"] == 3 and st["bits_full"] == pytest.approx(3 + 32 / 16)
    assert st["wbits"] == 3 and st["groupsize"] == 16 and st["n_weights"] == 16 * 64
    assert res.masks["scale"].shape == res.masks["zero"].shape == (16, 4)
    assert sorted(res.masks["perm"].tolist()) == list(range(64))
    # each column lies on the grid of the group it was visited in
    pos = torch.argsort(res.masks["perm"])  # original column -> visiting position
    for c in range(64):
        s, z = res.masks["scale"][:, pos[c] // 16], res.masks["zero"][:, pos[c] // 16]
        codes = res.weight[:, c] / s + z
        assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert res.weight.dtype == torch.float32
    # fp16 input works and is solved in fp32
    res16 = gptq.solve(W.half(), H, GPTQConfig(wbits=3))
    assert res16.weight.dtype == torch.float32


# ---------------------------------------------------------------- short last group (g does not divide d_in)


@pytest.mark.parametrize("kw", [dict(), dict(act_order=True), dict(static_groups=True),
                                dict(act_order=True, static_groups=True)],
                         ids=["natural", "act_order", "static", "act_order+static"])
def test_short_last_group_576_g128_equals_columnwise_reference(kw):
    """SmolLM2's 576 = 4·128 + 64: groups of 128 consecutive (visited) columns and a 64-column last group.

    With act-order the groups are consecutive *permuted* columns; with static groups they are the natural
    column groups, fitted up front and looked up by original column index (as the reference)."""
    W, H = make_problem(d_out=32, d_in=576, n=1024, seed=3, dead=[100, 575])
    res = gptq.solve(W, H, GPTQConfig(wbits=3, groupsize=128, **kw))
    Q = ref_obs(W, H, 3, groupsize=128, **kw)
    assert_same(res.weight, Q)
    visited = res.masks["perm"] if kw.get("act_order") else torch.arange(576)
    short = visited[512:]  # the short group's columns (in original indexing), natural: 512..575
    if kw.get("static_groups"):
        short = torch.arange(512, 576)
    assert_same(res.weight[:, short], Q[:, short])
    assert res.masks["scale"].shape == res.masks["zero"].shape == (32, 5)
    # the short group's own statistics: the codes of its columns are integers on its grid
    if not kw.get("act_order") or kw.get("static_groups"):
        s, z = res.masks["scale"][:, 4:5], res.masks["zero"][:, 4:5]
        codes = res.weight[:, 512:] / s + z
        assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert res.stats["bits_full"] == 3 + 32 * 5 / 576
    assert (res.weight[:, [100, 575]] == 0).all()


def test_short_last_group_static_fit_is_natural_and_up_front():
    """Static groups: (s, z) of the last natural group [512, 576) are the min-max fit of the dead-fixed
    original columns, whatever the visiting order."""
    W, H = make_problem(d_out=16, d_in=576, n=1024, seed=4)
    res = gptq.solve(W, H, GPTQConfig(wbits=3, groupsize=128, act_order=True, static_groups=True))
    for m, c0 in enumerate(range(0, 576, 128)):
        s, z = fit_minmax(W[:, c0 : c0 + 128], 3)
        assert torch.equal(res.masks["scale"][:, m : m + 1], s) and torch.equal(res.masks["zero"][:, m : m + 1], z)


# ---------------------------------------------------------------- damping and act-order: the references' expressions


def _official_inverse_cholesky(H, percdamp):
    """IST-DASLab/gptq's preparation of H, step by step (dead fix, fp32 damping, Cholesky, inverse, Cholesky)."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True), damp


def test_damping_is_the_reference_float32_expression():
    from oac.solvers.common import inverse_cholesky

    n_old_differs = 0
    for seed in range(12):
        W, H = make_problem(d_out=4, d_in=96, n=192, seed=seed, dead=[seed, 50])
        U, dead, info = inverse_cholesky(H, 0.01, order="dead_then_damp")
        U_ref, damp = _official_inverse_cholesky(H, 0.01)
        assert damp.dtype == torch.float32
        assert info["damp"] == float(damp)  # λ bit for bit
        assert torch.equal(U, U_ref)  # and so the whole factor
        # the former Python-double expression over the strided diagonal
        Hf = H.clone()
        Hf[dead, dead] = 1
        old = torch.tensor(0.01 * float(Hf.diagonal().mean()), dtype=torch.float32)
        n_old_differs += int(float(old) != float(damp))
    assert n_old_differs > 0  # the test can tell the two apart


def test_act_order_is_the_reference_argsort_with_ties():
    """Ties in diag H are ordered by the default (unstable) argsort, as the reference; not by a stable sort."""
    W, H = make_problem(d_out=8, d_in=128, n=256, seed=5)
    D = torch.diag(H).clone()
    D[::2] = D[1::2]  # 64 ties
    H = H - torch.diag(torch.diag(H)) + torch.diag(D) + 50 * torch.eye(128)
    res = gptq.solve(W, H, GPTQConfig(act_order=True))
    ref = torch.argsort(torch.diag(H), descending=True)
    assert not torch.equal(ref, torch.argsort(torch.diag(H), descending=True, stable=True))
    assert torch.equal(res.masks["perm"], ref)


def reference_gptq(W, H, wbits, groupsize=-1, blocksize=128, percdamp=0.01, act_order=False, static_groups=False):
    """METHODS.md B2 written with the reference's own tensor expressions (1-D column views, k=1 matmul for
    the in-block update, `-=` of a matmul for the lazy one, fp32 damping), to compare bit for bit."""
    W, H = W.clone().float(), H.clone()
    columns, maxq = W.shape[1], maxq_for(wbits)
    if groupsize == -1:
        scale, zero = fit_minmax(W, wbits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [fit_minmax(W[:, i : i + groupsize], wbits) for i in range(0, columns, groupsize)]
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = fit_minmax(W[:, i1 + i : i1 + i + groupsize], wbits)
                else:
                    idx = int(perm[i1 + i]) if act_order else i1 + i
                    scale, zero = groups[idx // groupsize]
            q = fake_quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, torch.argsort(perm)] if act_order else Q


@pytest.mark.parametrize("kw", [dict(), dict(groupsize=128), dict(groupsize=32, act_order=True),
                                dict(groupsize=128, act_order=True), dict(groupsize=128, static_groups=True),
                                dict(groupsize=64, act_order=True, static_groups=True), dict(blocksize=96)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "channel")
def test_bit_identical_to_the_reference_expressions(kw):
    """On a 576-wide layer (short last group at g128), with dead columns: equal bit for bit."""
    W, H = make_problem(d_out=48, d_in=576, n=1024, seed=6, dead=[11, 300])
    res = gptq.solve(W, H, GPTQConfig(wbits=3, **kw))
    assert torch.equal(res.weight, reference_gptq(W, H, 3, **kw))
