"""The preallocated `WiolaStaticCache` and the fast decoding built on it (`wiola.decode`).

Everything is compared with the growing `WiolaCache` path, which the other model tests tie to a full
forward: logits of every decode step for every component combination (ATM forced on and off, left
padding), `generate()` with `cache_implementation="static"` (greedy, beams), the decode step traced by
dynamo with `fullgraph=True` into a single graph, and `StaticDecoder` (greedy, seeded sampling, eos).
"""

from __future__ import annotations

import pytest
import torch

from wiola import WiolaCache, WiolaStaticCache
from wiola.decode import StaticDecoder, pick_next

from .conftest import COMBOS, build, combo_id, random_ids
from .test_generation import VARIANTS

PROMPT, STEPS = 6, 8


def padded_prompt():
    ids = random_ids(3, PROMPT, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0  # a single real token
    return ids, mask


def decode_both(model, steps: int = STEPS, max_cache_len: int = 32):
    """Logits of the prompt and of `steps` greedy steps on both caches (tokens chosen by the dynamic path)."""
    ids, mask = padded_prompt()
    dynamic, static = WiolaCache(model.config), WiolaStaticCache(model.config, max_cache_len=max_cache_len)
    pairs = []
    with torch.no_grad():
        a = model(ids, attention_mask=mask, past_key_values=dynamic).logits
        b = model(ids, attention_mask=mask, past_key_values=static).logits
        pairs.append((a[mask.bool()], b[mask.bool()]))
        for _ in range(steps):
            token = a[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            a = model(token, attention_mask=mask, past_key_values=dynamic).logits
            b = model(token, past_key_values=static).logits  # the static step needs no mask
            pairs.append((a, b))
    return pairs, dynamic, static


@pytest.mark.parametrize("atm", [False, True], ids=["atm-off", "atm-on"])
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_static_decode_equals_dynamic_cache(combo, atm):
    extra = dict(token_merging="atm", atm_threshold=-1.0) if atm else {}
    model = build(**combo, **extra)
    pairs, dynamic, static = decode_both(model)
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert static.get_seq_length() == dynamic.get_seq_length() == PROMPT + STEPS
    assert torch.equal(static.real_count, dynamic.real_count)
    ratios_a, ratios_b = dynamic.merge_ratios(), static.merge_ratios()
    assert ratios_a.keys() == ratios_b.keys() and (bool(ratios_a) == atm)
    for i in ratios_a:
        assert torch.equal(ratios_a[i], ratios_b[i])
        assert torch.equal(static.layers[i].lengths, dynamic.layers[i].lengths)


def test_static_cache_state_round_trips_and_continues_in_chunks():
    model = build(**VARIANTS["all"])
    pairs, dynamic, static = decode_both(model, steps=3)
    chunk = random_ids(3, 4, seed=9)
    mask = torch.ones(3, PROMPT + 3 + 4, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    with torch.no_grad():
        a = model(chunk, attention_mask=mask, past_key_values=dynamic).logits
        b = model(chunk, attention_mask=mask, past_key_values=static).logits  # several tokens: ordinary path, then reload
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        token = a[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        torch.testing.assert_close(model(token, past_key_values=static).logits,
                                   model(token, attention_mask=mask, past_key_values=dynamic).logits, rtol=0, atol=1e-5)


def test_static_cache_limits_and_refusals():
    model = build()
    cache = WiolaStaticCache(model.config, max_cache_len=PROMPT + 1)
    ids = random_ids(1, PROMPT)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="full"):
            model(ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="do not fit"):
            model(ids, past_key_values=WiolaStaticCache(model.config, max_cache_len=PROMPT - 1))
    with pytest.raises(NotImplementedError):
        cache.crop(2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        WiolaStaticCache(model.config, max_cache_len=model.config.max_position_embeddings + 1)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.ready


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_with_static_cache_equals_default(variant):
    model = build(eos_token_id=None, **VARIANTS[variant])
    ids, mask = padded_prompt()
    from transformers import set_seed

    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=2, num_return_sequences=2), dict(do_sample=True, top_k=10)):
        set_seed(3)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, **kw)
        set_seed(3)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, cache_implementation="static", **kw)
        assert torch.equal(got, expected), kw


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_decode_step_is_one_graph_without_breaks(variant):
    """transformers compiles the forward of decode steps on a compileable cache (on CPU only when asked);
    `fullgraph=True` fails on any graph break, and one graph for all steps means no recompilation."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    model = build(eos_token_id=None, **VARIANTS[variant])
    ids, mask = padded_prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers' switch to compile on CPU
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation="static", compile_config=config)
    assert torch.equal(got, expected)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_static_decoder_greedy_equals_generate(variant, compiled):
    model = build(eos_token_id=None, **VARIANTS[variant])
    ids, mask = padded_prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    decoder = StaticDecoder(model, max_cache_len=PROMPT + 12, compile=compiled, backend="eager")
    assert torch.equal(decoder.generate(ids, attention_mask=mask, max_new_tokens=12), expected)
    assert torch.equal(decoder.generate(ids, attention_mask=mask, max_new_tokens=12), expected)  # buffers reused


def test_static_decoder_sampling_is_seeded_and_top_k_1_is_greedy():
    model = build(eos_token_id=None, **VARIANTS["seed"])
    decoder = StaticDecoder(model, max_cache_len=32)
    ids = random_ids(4, 5).repeat(1, 1)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    first = decoder.generate(ids, seed=1, **kw)
    assert torch.equal(decoder.generate(ids, seed=1, **kw), first)
    assert not torch.equal(decoder.generate(ids, seed=2, **kw), first)
    greedy = decoder.generate(ids, max_new_tokens=16)
    assert torch.equal(decoder.generate(ids, max_new_tokens=16, do_sample=True, top_k=1, seed=5), greedy)


def test_static_decoder_stops_at_eos_and_pads_finished_rows():
    model = build(eos_token_id=None)
    decoder = StaticDecoder(model, max_cache_len=40)
    ids = random_ids(2, 5)
    free = decoder.generate(ids, max_new_tokens=20)
    eos = int(free[0, 7])  # row 0 emits this token at its third new position
    out = decoder.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    stop = (out[0, 5:] == eos).nonzero()[0, 0].item()
    assert torch.equal(out[0, : 5 + stop + 1], free[0, : 5 + stop + 1])
    assert (out[0, 5 + stop + 1 :] == 0).all()
    finished = [(row[5:] == eos).any().item() for row in out]
    assert out.shape[1] < 25 or not all(finished)  # stops early once every row has finished


def test_static_decoder_streams_and_checks_its_inputs():
    model = build(eos_token_id=None)
    decoder = StaticDecoder(model, max_cache_len=12)

    class Recorder:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.clone())

        def end(self):
            self.ended = True

    streamer = Recorder()
    out = decoder.generate(random_ids(1, 4), max_new_tokens=8, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat([p.reshape(1, -1) for p in streamer.parts], dim=1), out)
    with pytest.raises(ValueError, match="exceeds the cache"):
        decoder.generate(random_ids(1, 5), max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt_len"):
        decoder.generate(torch.empty(1, 0, dtype=torch.long), max_new_tokens=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="WiolaForCausalLM"):
        StaticDecoder(LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)))


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (8, 0.5)])
def test_pick_next_filters_like_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = TemperatureLogitsWarper(0.7)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p:
        scores = TopPLogitsWarper(top_p)(None, scores)
    allowed = torch.isfinite(scores)
    draws = torch.stack([pick_next(logits, True, 0.7, top_k, top_p, torch.Generator().manual_seed(s)) for s in range(300)], dim=1)
    assert allowed.gather(1, draws).all()  # never a filtered token
    seen = torch.zeros_like(allowed).scatter_(1, draws, True)
    assert (seen <= allowed).all() and (seen.sum(1) >= torch.minimum(allowed.sum(1), torch.tensor(2))).all()
