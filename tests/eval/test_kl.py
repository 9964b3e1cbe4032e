"""KL to the full-precision model: exact against a plain reference, 0 against itself, cached = recomputed."""

from __future__ import annotations

import copy

import pytest
import torch

from oac.eval.kl import KLAccumulator, ensure_reference
from oac.eval.perplexity import perplexity

SEQLEN = 64


def _windows(tok, data_dir, n=3):
    from oac.data.tokens import eval_stream

    ids = eval_stream(tok, "wikitext2", SEQLEN, data_dir=data_dir)
    return ids[0, : n * SEQLEN].view(n, SEQLEN)


def _key(mode="full", topk=None, tag="a"):
    return {"model": "stories260K", "tag": tag, "mode": mode, "topk": topk, "v": 1}


def _kl(model, windows, ref, batch_size=1):
    acc = KLAccumulator(ref, windows.shape[0], SEQLEN)
    perplexity(model, windows.reshape(1, -1), SEQLEN, batch_size=batch_size, on_logits=acc)
    return acc.result()


def _perturbed(model, scale=0.05, seed=0):
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return q


@torch.no_grad()
def _plain_kl(fp, q, windows):
    """Token by token over the full vocabulary, straight from the definition Σ_v p_v (log p_v − log q_v)."""
    total, agree, n = 0.0, 0, 0
    for w in windows:
        lp = torch.log_softmax(fp(input_ids=w[None]).logits[0, :-1].double(), -1)
        lq = torch.log_softmax(q(input_ids=w[None]).logits[0, :-1].double(), -1)
        for t in range(lp.shape[0]):
            p = lp[t].exp()
            total += float((p * (lp[t] - lq[t])).sum())
            agree += int(lp[t].argmax() == lq[t].argmax())
            n += 1
    return total / n, agree / n, n


def test_kl_of_a_model_against_itself_is_zero(stories, data_dir, tmp_path, single_thread):
    model, tok = stories
    w = _windows(tok, data_dir)
    ref = ensure_reference(model, w, cache_dir=tmp_path, key=_key(), batch_size=1, device="cpu")
    r = _kl(model, w, ref)
    assert abs(r["kl"]) < 1e-6 and r["top1_agreement"] == 1.0 and r["n_predicted"] == 3 * (SEQLEN - 1)


def test_batched_kl_equals_a_plain_full_vocabulary_reference(stories, data_dir, tmp_path, single_thread):
    model, tok = stories
    q = _perturbed(model)
    w = _windows(tok, data_dir)
    ref = ensure_reference(model, w, cache_dir=tmp_path, key=_key(), batch_size=2, device="cpu")
    r = _kl(q, w, ref, batch_size=2)
    kl, agree, n = _plain_kl(model, q, w)
    assert kl > 1e-3  # the perturbation is visible
    assert r["kl"] == pytest.approx(kl, rel=1e-4) and r["top1_agreement"] == agree and r["n_predicted"] == n


def test_cached_reference_gives_the_same_kl_as_recomputing(stories, data_dir, tmp_path, single_thread):
    model, tok = stories
    q = _perturbed(model, seed=1)
    w = _windows(tok, data_dir)
    first = ensure_reference(model, w, cache_dir=tmp_path / "a", key=_key(), batch_size=1, device="cpu")
    again = ensure_reference(model, w, cache_dir=tmp_path / "a", key=_key(), batch_size=1, device="cpu")
    fresh = ensure_reference(model, w, cache_dir=tmp_path / "b", key=_key(), batch_size=3, device="cpu")
    assert not first["cached"] and again["cached"] and again["path"] == first["path"]
    assert _kl(q, w, again) == _kl(q, w, fresh)


def test_topk_reference_is_a_lower_bound_with_exact_top1(stories, data_dir, tmp_path, single_thread):
    model, tok = stories
    q = _perturbed(model, seed=2)
    w = _windows(tok, data_dir)
    full = _kl(q, w, ensure_reference(model, w, cache_dir=tmp_path, key=_key(), batch_size=1, device="cpu"))
    top = _kl(q, w, ensure_reference(model, w, cache_dir=tmp_path, key=_key("topk", 16), batch_size=1, device="cpu"))
    assert top["kl"] <= full["kl"] + 1e-9 and top["kl"] > 0.5 * full["kl"]
    assert top["top1_agreement"] == full["top1_agreement"]


def test_truncated_reference_is_moved_aside_and_rebuilt(stories, data_dir, tmp_path, single_thread):
    model, tok = stories
    w = _windows(tok, data_dir)
    ref = ensure_reference(model, w, cache_dir=tmp_path, key=_key(), batch_size=1, device="cpu")
    data = open(ref["path"], "rb").read()
    open(ref["path"], "wb").write(data[: len(data) // 2])
    again = ensure_reference(model, w, cache_dir=tmp_path, key=_key(), batch_size=1, device="cpu")
    assert not again["cached"] and abs(_kl(model, w, again)["kl"]) < 1e-6
