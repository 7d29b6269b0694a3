"""Bad input gives a clear error, not a crash deep inside torch."""

from __future__ import annotations

import pytest
import torch
from wiola.compat_wiola import output_cache

from .conftest import build, random_ids


@pytest.fixture(scope="module")
def model():
    return build(cross_layer_context="gcla", token_merging="atm", atm_threshold=0.5)


def test_token_id_outside_vocabulary_is_named(model):
    ids = random_ids(1, 6)
    ids[0, 3] = 61
    with pytest.raises(ValueError, match=r"token id 61 is outside the vocabulary \[0, 61\)"):
        model(ids)
    ids[0, 3] = -5
    with pytest.raises(ValueError, match="token id -5"):
        model(ids)


def test_sequence_longer_than_context(model):
    with pytest.raises(ValueError, match="65 tokens .* exceeds max_position_embeddings=64"):
        model(random_ids(1, 65))
    out = model(random_ids(1, 60), use_cache=True)
    with pytest.raises(ValueError, match=r"65 tokens \(60 cached \+ 5 new\)"):
        model(random_ids(1, 5), past_key_values=output_cache(out), use_cache=True)
    model(random_ids(1, 64))  # exactly the context is fine


def test_generation_past_context_stops_with_clear_error(model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.generate(random_ids(1, 60), max_new_tokens=10, do_sample=False)


def test_empty_input(model):
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(0, 4, dtype=torch.long))


def test_mismatched_attention_mask(model):
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected \(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(ids[0])
