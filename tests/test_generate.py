"""`wiola generate`: greedy output equals a hand-rolled argmax loop; sampling is seeded; limits are enforced."""

from __future__ import annotations

import re

import pytest
import torch

from tests.train.tinyrun import FAST, make_dataset, write_model_config
from wiola.cli import main
from wiola.generate import generate_command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    data = make_dataset(root / "data")
    out = root / "run"
    assert main(["train", str(write_model_config(root / "m.json")), str(data), str(out), *FAST,
                 "--max-steps", "20", "--eval-every", "100"]) == 0
    return out


def test_greedy_matches_argmax_loop_and_streams(trained, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["generate", str(trained), "the king", "--greedy", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    streamed = capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    ids = tok("the king", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(12):  # full forward each step, no cache: an independent reference
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tok.decode(ids[0], skip_special_tokens=True)
    assert streamed.strip() == expected.strip()
    assert generate_command(str(trained), prompt="the king", greedy=True, max_new_tokens=12, device="cpu", stream=False) == [expected]


def test_sampling_is_seeded_and_draws_several_samples(trained, capsys):
    kw = dict(prompt="a fool", max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95, device="cpu", num_samples=3)
    first = generate_command(str(trained), seed=1, **kw)
    assert len(first) == 3 and all(t.startswith("a fool") for t in first)
    assert len(set(first)) > 1
    assert generate_command(str(trained), seed=1, **kw) == first
    assert generate_command(str(trained), seed=2, **kw) != first
    printed = capsys.readouterr().out
    assert printed.count("--- sample") == 9


def test_prompt_longer_than_context_is_an_error(trained, capsys):
    long_prompt = "the king speaks to the queen. " * 40
    assert main(["generate", str(trained), long_prompt, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "longer than the model's context of 64" in err and err.count("\n") == 1


def test_new_tokens_are_capped_by_the_context_and_empty_prompt_works(trained, capsys):
    texts = generate_command(str(trained / "checkpoints" / "final"), prompt="", max_new_tokens=500, greedy=True, device="cpu", stream=False)
    assert len(texts) == 1 and texts[0]
    assert "capped at 63" in capsys.readouterr().err


def test_static_and_generate_paths_agree_and_static_needs_wiola(trained, tmp_path, capsys):
    kw = dict(prompt="the king", greedy=True, max_new_tokens=12, device="cpu", stream=False)
    assert generate_command(str(trained), decoding="static", **kw) == generate_command(str(trained), decoding="generate", **kw)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(trained)
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=64)).save_pretrained(llama)
    tok.save_pretrained(llama)
    assert len(generate_command(str(llama), **kw)) == 1  # auto: transformers' generate() for other models
    assert main(["generate", str(llama), "the king", "--decoding", "static", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--decoding static needs a Wiola model" in err and err.count("\n") == 1


@pytest.mark.parametrize("decoding", ["static", "generate"])
def test_many_samples_decode_in_batches_of_bounded_memory(trained, monkeypatch, capsys, decoding):
    """Issue 26 item 8: `--num-samples 10000` decoded every sample in one batch, until the out-of-memory killer
    ended the process. Samples now go in batches whose estimated memory stays within SAMPLE_BATCH_BYTES."""
    from transformers import AutoConfig, AutoTokenizer

    import wiola.generate as gen
    from wiola.decode import StaticDecoder
    from wiola.modeling_wiola import WiolaForCausalLM

    kw = dict(prompt="a fool", max_new_tokens=8, temperature=1.0, top_k=20, device="cpu", decoding=decoding,
              engine="torch" if decoding == "static" else "auto")
    small = generate_command(str(trained), num_samples=2, seed=5, **kw)  # fits one batch at the default budget
    config = AutoConfig.from_pretrained(trained)
    needed = len(AutoTokenizer.from_pretrained(trained)("a fool").input_ids) + 8  # prompt + new tokens
    per_sample = gen.sample_bytes(config, gen.cache_slots(needed, 64) if decoding == "static" else needed)
    assert gen.samples_per_batch(config, 64, 10_000) * gen.sample_bytes(config, 64) <= gen.SAMPLE_BATCH_BYTES
    # a budget of two and a half samples: batches of 2, 2, 1
    monkeypatch.setattr(gen, "SAMPLE_BATCH_BYTES", int(per_sample * 2.5))
    sizes = []
    for cls, name in ((StaticDecoder, "generate"), (WiolaForCausalLM, "generate")):
        original = getattr(cls, name)

        def spy(self, *args, _original=original, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            n = kwargs["generation_config"].num_return_sequences if "generation_config" in kwargs else ids.shape[0]
            sizes.append(n)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    capsys.readouterr()
    texts = generate_command(str(trained), num_samples=5, seed=5, **kw)
    assert sizes == [2, 2, 1]
    assert len(texts) == 5 and all(t.startswith("a fool") for t in texts)
    assert texts[:2] == small  # the first batch draws with the seed itself, as one batch did
    printed = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"--- sample (\d+) ---", printed)] == [1, 2, 3, 4, 5]
    assert generate_command(str(trained), num_samples=5, seed=5, **kw) == texts  # still seeded
