"""`wiola bench` end to end at toy size: both models measured, ratios printed, JSON written."""

from __future__ import annotations

import json

from wiola.bench import llama_twin, matmul_params
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
                 "--warmup", "1", "--new-tokens", "4", "--device", "cpu", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| train eager batch 2 tokens_per_s |" in text and "| decode eager batch 1 tokens_per_s |" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["what"]) for r in rows} == {("wiola", "train"), ("llama", "train"), ("wiola", "decode"), ("llama", "decode")}
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_unknown_component_is_one_clear_line(capsys, tmp_path):
    assert main(["bench", "--set", "mlp=moe", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "mlp='moe' is not valid; choose one of: swiglu, butterfly, dsff, gelu" in err
