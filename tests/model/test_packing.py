"""Packed rows (position_ids restarting at 0 at each document start, as transformers' flattening collator and
TRL's packing write them): each document's logits equal the document run alone, for every component
combination, ATM forced on included (mask and FlexAttention kernels)."""

from __future__ import annotations

import pytest
import torch

from .conftest import build, random_ids

LENGTHS = (7, 5, 9)


def _packed(seed: int = 0):
    docs = [random_ids(1, n, seed=seed + i) for i, n in enumerate(LENGTHS)]
    ids = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return docs, ids, positions


def _check(model, atol=1e-5):
    docs, ids, positions = _packed()
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        start = 0
        for doc in docs:
            alone = model(doc).logits
            torch.testing.assert_close(packed[:, start:start + doc.shape[1]], alone, atol=atol, rtol=0)
            start += doc.shape[1]


@pytest.mark.parametrize("atm", [False, True], ids=["atm-off", "atm-forced"])
def test_packed_row_equals_documents_alone(combo, atm):
    _check(build(**combo, **(dict(token_merging="atm", atm_threshold=-1.0) if atm else {})))


@pytest.mark.parametrize("kernel", ["mask", "flex"])
@pytest.mark.parametrize("family", ["paper", "seed"])
def test_packed_row_with_atm_forced_on(family, kernel):
    extra = dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm") if family == "paper" \
        else dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly")
    model = build(token_merging="atm", atm_threshold=-1.0, atm_kernel=kernel, **extra)
    _check(model)
    # merging happened, and no pair spans a document boundary
    docs, ids, positions = _packed()
    with torch.no_grad():
        out = model(ids, position_ids=positions)
    assert out.merge_ratios and all(float(r) > 0.3 for r in out.merge_ratios.values())


def test_packing_changes_nothing_without_restarts_and_gradients_flow():
    model = build(cross_layer_context="gcla", attention_gate="gsa", token_merging="atm", atm_threshold=0.0).train()
    ids = random_ids(2, 12)
    plain = model(ids).logits
    torch.testing.assert_close(model(ids, position_ids=torch.arange(12)[None].expand(2, 12)).logits, plain, atol=0, rtol=0)
    docs, ids, positions = _packed()
    model(ids, position_ids=positions, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_packed_rows_do_not_continue_a_cache():
    from wiola import WiolaCache

    model = build()
    _, ids, positions = _packed()
    out = model(ids, position_ids=positions, use_cache=True)
    from wiola.compat_wiola import output_cache

    assert output_cache(out) is None  # a packed batch is not continued
    with pytest.raises(ValueError, match="packed rows"):
        model(ids, position_ids=positions, past_key_values=WiolaCache(model.config), use_cache=True)
