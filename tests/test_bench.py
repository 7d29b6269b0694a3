"""`wiola bench` end to end at toy size: both models measured along every path, ratios printed, JSON
written; the LLaMA static-cache reference loop decodes exactly what LLaMA's generate() does."""

from __future__ import annotations

import json

import pytest
import torch

from wiola.bench import llama_static_loop, llama_twin, matmul_params
from wiola.cli import main
from wiola.configuration_wiola import WiolaConfig, count_parameters


def test_llama_twin_has_the_same_shape_and_budget():
    from transformers import LlamaForCausalLM

    config = WiolaConfig.from_preset("wiola-nano", vocab_size=512)
    twin = LlamaForCausalLM(llama_twin(config))
    assert (twin.config.hidden_size, twin.config.num_hidden_layers, twin.config.num_attention_heads) == (256, 6, 8)
    n = sum(p.numel() for p in twin.parameters())
    assert abs(n - count_parameters(config)) <= 3 * 256 * 6 * 4  # SwiGLU width rounded to a multiple of 8
    assert matmul_params(twin) == n  # tied: the embedding table is the LM head


def test_bench_command_prints_ratios_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--config", "wiola-nano", "--set", "vocab_size=128", "num_hidden_layers=1", "hidden_size=64",
                 "num_attention_heads=2", "num_key_value_heads=2", "intermediate_size=64", "--train-batch", "2", "--seq-len", "16", "--train-steps", "2",
                 "--warmup", "1", "--new-tokens", "4", "--rounds", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for line in ("| train eager batch 2 tokens_per_s |", "| decode generate() eager batch 1 tokens_per_s |",
                 "| decode static loop eager batch 1 tokens_per_s |", "| decode batch 1: wiola static loop (eager) vs llama generate() tokens_per_s |"):
        assert line in text
    assert "tokens identical across decoding paths: yes" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["what"]) for r in rows} == {(m, w) for m in ("wiola", "llama") for w in ("train", "decode generate()", "decode static loop")}
    assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_llama_static_loop_decodes_like_generate(compiled):
    if compiled and tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7):
        pytest.skip("torch 2.6 (measured with transformers 5.0): dynamo cannot trace transformers' LLaMA forward "
                    "fullgraph (`co_varnames` in its output-capturing wrapper); the compiled LLaMA row needs torch >= 2.7")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = WiolaConfig.from_preset("wiola-nano", vocab_size=128, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    model = LlamaForCausalLM(llama_twin(config)).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[:, 7:]
    # backend="eager" traces the step with dynamo, fullgraph, without paying for code generation
    loop = llama_static_loop(model, 10, 17, compile=compiled, backend="eager")
    with torch.no_grad():
        assert torch.equal(loop(ids), expected)
        assert torch.equal(loop(ids), expected)  # the cache resets between runs


def test_unknown_component_is_one_clear_line(capsys, tmp_path):
    assert main(["bench", "--set", "mlp=moe", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "mlp='moe' is not valid; choose one of: swiglu, butterfly, dsff, gelu" in err
