"""`model.generate` with the WiolaCache: greedy, sampling, left-padded batches, beam search."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging import version
from wiola.compat_wiola import output_cache

from wiola import WiolaCache

from .conftest import build, random_ids

VARIANTS = {
    "llama": dict(),
    "seed": dict(position_encoding="spiral", attention_gate="gsa", mlp="butterfly"),
    "paper": dict(position_encoding="srpe", cross_layer_context="gcla", mlp="dsff", norm="wiola_rmsnorm", token_merging="atm", atm_threshold=-1.0),
    "all": dict(position_encoding="srpe", attention_gate="gsa", gate_pre_rope=False, cross_layer_context="gcla", mlp="butterfly", token_merging="atm", atm_threshold=0.0),
    "article": dict(position_encoding="srpe", cross_layer_context="gcla", token_merging="atm", atm_threshold=-1.0, mlp="f3n", f3n_gate="agu", f3n_levels=3, f3n_level=2, norm="hln"),
}


def argmax_loop(model, ids, steps):
    for _ in range(steps):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request) -> dict:
    return VARIANTS[request.param]


@pytest.fixture
def model(variant):
    # eos id out of reach so every run generates the full length
    return build(eos_token_id=None, **variant)


def test_greedy_generate_equals_argmax_loop(model):
    ids = random_ids(1, 7)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, argmax_loop(model, ids, 12))


def test_generate_uses_wiola_cache(model):
    ids = random_ids(1, 5)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(out), WiolaCache)
    assert output_cache(out).get_seq_length() == 5 + 3 - 1


def test_seeded_sampling_is_reproducible(model):
    ids = random_ids(2, 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, top_p=0.95))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(124)
    assert not torch.equal(runs[0], model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, top_p=0.95))


def test_batched_left_padded_generation_equals_one_by_one(model):
    prompts = [random_ids(1, n, seed=n)[0] for n in (8, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batched[i, width:], alone[0, len(p):])


def test_beam_search_with_cache_returns_best_beam(model):
    ids = random_ids(2, 6)
    kw = dict(max_new_tokens=8, num_beams=4, num_return_sequences=4, do_sample=False, early_stopping=True, return_dict_in_generate=True, output_scores=True, length_penalty=0.0)
    cached = model.generate(ids, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)
    scores = cached.sequences_scores.view(2, 4)
    assert torch.equal(scores.argmax(dim=1), torch.zeros(2, dtype=torch.long))  # the first returned is the best
    # its score is the summed log-probability of its tokens under the model
    seq = cached.sequences[0:1]
    logp = torch.log_softmax(model(seq, use_cache=False).logits[0, :-1], -1)
    gen = seq[0, 6:]
    total = logp[5:].gather(1, gen[:, None]).sum()
    torch.testing.assert_close(scores[0, 0], total, atol=1e-4, rtol=0)


def _count_crops(monkeypatch):
    """Record how many tokens each WiolaCache.crop call drops (to show the test really undoes tokens)."""
    dropped = []
    original = WiolaCache.crop

    def crop(self, max_length):
        before = self.get_seq_length()
        original(self, max_length)
        dropped.append(before - self.get_seq_length())

    monkeypatch.setattr(WiolaCache, "crop", crop)
    return dropped


def test_assisted_decoding_with_a_wiola_draft_equals_greedy(model, variant, monkeypatch):
    ids = random_ids(1, 7)
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)
    dropped = _count_crops(monkeypatch)
    draft = build(seed=1, eos_token_id=None, num_hidden_layers=2, **variant)  # a smaller Wiola model of the same family
    assisted = model.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft, num_assistant_tokens=4)
    assert torch.equal(assisted, greedy)
    assert sum(dropped) > 0  # rejected draft tokens were cropped from both caches


@pytest.mark.skipif(version.parse(transformers.__version__) < version.parse("5.13"),
                    reason="transformers <5.13: prompt lookup decoding fails without an eos token (torch.isin on None), "
                           "and this test's model has none")
def test_prompt_lookup_decoding_equals_greedy(model, monkeypatch):
    ids = random_ids(1, 6).repeat(1, 3)  # repeats give the lookup something to propose
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)
    dropped = _count_crops(monkeypatch)
    lookup = model.generate(ids, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, greedy)
    assert sum(dropped) > 0


def test_assisted_decoding_with_a_static_cache_is_refused(model):
    with pytest.raises(ValueError, match="cropped|not supported with Static cache"):  # ours, or transformers 5.0's own refusal first
        model.generate(random_ids(1, 5), max_new_tokens=3, prompt_lookup_num_tokens=2, cache_implementation="static")
