"""Causal Adaptive Token Merging: pairing rule, cache size, exact no-merge limit, kernels, merge ratios.

(Causality, cache consistency and padding invariance with merging forced on are covered for every
component combination in test_modeling.py; beam search and batched generation in test_generation.py.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from wiola.compat_wiola import output_cache

from wiola.merging_wiola import take_edges

from .conftest import build, random_ids

warnings.filterwarnings("ignore", message=".*flex_attention.*")
PAPER = dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", token_merging="atm")


def greedy_pairing_loop(ok: list[bool], prev_taken: bool) -> list[bool]:
    """The rule of docs/architecture.md §2.3 step 2 written as the obvious loop: take edge t iff it qualifies and edge t−1 was not taken."""
    taken, last = [], prev_taken
    for edge_ok in ok:
        last = bool(edge_ok and not last)
        taken.append(last)
    return taken


def test_vectorised_pairing_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    for density in (0.2, 0.5, 0.9, 1.0):
        ok = torch.rand(64, 33, generator=g) < density
        prev = torch.rand(64, generator=g) < 0.5
        got = take_edges(ok, prev)
        for row in range(64):
            assert got[row].tolist() == greedy_pairing_loop(ok[row].tolist(), bool(prev[row]))


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.4])
def test_cache_holds_t_minus_merged_pairs(threshold):
    model = build(**PAPER, atm_threshold=threshold)
    ids = random_ids(3, 21)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = output_cache(out)
    real = mask.sum(1)
    for i, layer in enumerate(cache.layers):
        if i in model.config.merge_layers:
            merged_pairs = torch.round(out.merge_ratios[i] * real.sum()).long()
            assert layer.lengths.sum() == real.sum() - merged_pairs
            assert layer.keys.shape[2] == int(layer.lengths.max())
            ratios = cache.merge_ratios()[i]
            torch.testing.assert_close(ratios, 1 - layer.lengths.float() / real.float())
        else:
            assert layer.keys.shape[2] == 21  # plain layers keep every token (pads included)
    if threshold == -1.0:  # every other edge between real tokens: ⌊n/2⌋ pairs per row
        for i in model.config.merge_layers:
            torch.testing.assert_close(cache.layers[i].lengths, real - real // 2)


def test_merge_ratio_output_with_forced_merging():
    model = build(**PAPER, atm_threshold=-1.0)
    out = model(random_ids(2, 12))
    assert set(out.merge_ratios) == set(model.config.merge_layers) == {2, 3}
    for value in out.merge_ratios.values():
        assert value.item() == pytest.approx(0.5)
    assert model.model.last_merge_ratios.keys() == out.merge_ratios.keys()
    assert build(**{**PAPER, "token_merging": "none"})(random_ids(1, 5)).merge_ratios is None


def test_threshold_above_one_is_exactly_merging_off():
    on = build(**PAPER, atm_threshold=1.5)
    off = build(**{**PAPER, "token_merging": "none"})
    off.load_state_dict(on.state_dict())
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert torch.equal(on(ids, attention_mask=mask).logits, off(ids, attention_mask=mask).logits)
    assert torch.equal(on.generate(ids[:1], max_new_tokens=5, do_sample=False), off.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_merging_machinery_without_merges_matches_plain_attention():
    """τ just below 1 keeps the ATM code path but no edge qualifies on random data."""
    on = build(**PAPER, atm_threshold=0.9999)
    off = build(**{**PAPER, "token_merging": "none"})
    off.load_state_dict(on.state_dict())
    ids = random_ids(2, 16)
    out = on(ids)
    assert all(v.item() == 0 for v in out.merge_ratios.values())
    torch.testing.assert_close(out.logits, off(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_flex_kernel_equals_eager_reference(threshold, heads):
    kw = dict(PAPER, attention_gate="gsa", atm_threshold=threshold, num_attention_heads=heads[0], num_key_value_heads=heads[1])
    flex, eager = build(**kw, atm_kernel="flex"), build(**kw, atm_kernel="mask")
    eager.set_attn_implementation("eager")
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():  # FlexAttention has no CPU backward; on CUDA it trains
        got, want = flex(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        # a flex prefill leaves the same compacted cache: decoding on from it matches the full forward
        out = flex(ids[:, :30], attention_mask=mask[:, :30], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(30, 40):
            step = flex(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            logits.append(step.logits)
        torch.testing.assert_close(torch.cat(logits, 1)[real], want[real], atol=1e-4, rtol=0)


def test_training_with_merging_has_gradients():
    model = build(**PAPER, atm_threshold=0.0).train()
    ids = random_ids(2, 24)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "layers.2.self_attn.k_proj" in n]
    assert torch.isfinite(loss) and grads[0].abs().sum() > 0


@pytest.mark.parametrize("n_rep", [1, 2])
def test_flex_kernel_in_bf16_stays_within_the_bf16_tolerance(n_rep):
    """Issue bound for bf16: one ATM layer's attention, fast path against the eager reference, both fed
    the same bf16 inputs, ≤2e-2 (here on CPU, FlexAttention unfused; on a GPU the fused kernel)."""
    from wiola.merging_wiola import merged_attention

    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 4, 64, 32
    q, x = torch.randn(b, h, t, d, generator=g), torch.randn(b, t, 48, generator=g)
    k, v = torch.randn(b, h // n_rep, t, d, generator=g), torch.randn(b, h // n_rep, t, d, generator=g)
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, :9] = False
    args = [a.to(torch.bfloat16) for a in (q, k, v, x)]
    with torch.no_grad():
        fast, joins = merged_attention(*args, real, -1.0, n_rep, "sdpa", kernel="flex")
        ref, joins_ref = merged_attention(*args, real, -1.0, n_rep, "eager", kernel="mask")
    assert torch.equal(joins, joins_ref) and joins.sum() > 0
    torch.testing.assert_close(fast[real[:, None, :].expand(b, h, t)].float(), ref[real[:, None, :].expand(b, h, t)].float(), atol=2e-2, rtol=0)


def test_flex_kernel_takes_mixed_dtypes_from_autocast():
    """Under autocast a layer can hand FlexAttention a float32 query and key with a bfloat16 value; torch 2.6
    refuses mixed dtypes, so the kernel computes in the common dtype and answers in the query's."""
    from wiola.merging_wiola import _flex_attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    v = torch.randn(1, 2, 16, 8, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        mixed, same = _flex_attention(q, k, v), _flex_attention(q, k, v.float())
    assert mixed.dtype == torch.float32 and torch.equal(mixed, same)
    out16 = _flex_attention(q.to(torch.bfloat16), k, v)  # the output follows the query
    assert out16.dtype == torch.bfloat16


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.5])
def test_one_token_path_equals_the_any_length_path_on_fixed_state(threshold):
    """`_fixed_token` (a chunk of one, store then attend: the export's one-token body) computes what `_fixed_any`
    (the any-length chunk) computes for that token — output, joins and the whole new state — on rows that cover
    every case: an empty state, a previous token that was padding or had itself joined, a padding token now, a
    token that joins and one that does not (the slots past a row's groups hold garbage, as after a padding step)."""
    from types import SimpleNamespace

    from wiola.merging_wiola import _fixed_any, _fixed_token

    g = torch.Generator().manual_seed(0)
    b, h, h_kv, d, dim, cap = 8, 4, 2, 8, 16, 10
    x_last = torch.randn(b, dim, generator=g)
    x = torch.where(torch.arange(b)[:, None] % 2 == 0, x_last + 0.05 * torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g))[:, None]
    lengths = torch.tensor([0, 3, 5, 2, 9, 4, 1, 6])
    real = torch.tensor([[True], [True], [False], [True], [True], [False], [True], [True]])
    state = dict(keys=torch.randn(b, h_kv, cap, d, generator=g), values=torch.randn(b, h_kv, cap, d, generator=g), lengths=lengths,
                 last_x=x_last, last_real=torch.tensor([False, True, True, True, False, True, True, True]),
                 last_taken=torch.tensor([False, False, False, True, False, False, True, False]))
    q, k, v = torch.randn(b, h, 1, d, generator=g), torch.randn(b, h_kv, 1, d, generator=g), torch.randn(b, h_kv, 1, d, generator=g)
    one, anyl = SimpleNamespace(**state), SimpleNamespace(**state)
    out_one, join_one = _fixed_token(q, k, v, x, real, threshold, h // h_kv, "eager", one)
    out_any, join_any = _fixed_any(q, k, v, x, real, threshold, h // h_kv, "eager", anyl)
    assert torch.equal(join_one, join_any) and torch.allclose(out_one, out_any, atol=1e-6)
    assert torch.equal(one.lengths, anyl.lengths) and torch.equal(one.last_real, anyl.last_real) and torch.equal(one.last_taken, anyl.last_taken)
    assert torch.equal(one.last_x, anyl.last_x)
    stored = torch.arange(cap)[None, :] < one.lengths[:, None]  # the groups; past them neither path promises anything
    for name in ("keys", "values"):
        assert torch.allclose(getattr(one, name)[stored[:, None, :, None].expand(-1, h_kv, -1, d)],
                              getattr(anyl, name)[stored[:, None, :, None].expand(-1, h_kv, -1, d)], atol=1e-6)
    if threshold == -1.0:
        assert join_one.any() and (~join_one & real).any()
