"""Schedules, weight-decay groups, option layering and model-config resolution."""

from __future__ import annotations

import pytest
import torch

from wiola.errors import WiolaError
from wiola.train.config import TrainConfig, build_model, config_differences, make_model_config, parse_overrides, split_config_source
from wiola.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups

from .tinyrun import TINY_MODEL


def lrs(**kw):
    cfg = TrainConfig.layered({"max_steps": 100, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, **kw}).finalize(1, 64)
    f = lr_multiplier(cfg)
    return [f(s) for s in range(cfg.max_steps)]


def test_warmup_then_cosine_to_min_lr():
    v = lrs(schedule="cosine")
    assert v[:3] == pytest.approx([0.1, 0.2, 0.3]) and v[9] == pytest.approx(1.0)
    assert v[10] == pytest.approx(1.0) and v[55] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(v[10:], v[11:]))  # monotone decay
    assert lr_multiplier(TrainConfig.layered({"max_steps": 100, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}).finalize(1, 64))(100) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly_in_the_last_fraction():
    v = lrs(schedule="wsd", decay_fraction=0.2)  # 90 post-warmup steps -> 18 decay steps starting at 82
    assert v[10:82] == [1.0] * 72
    assert v[82] == pytest.approx(1.0) and v[91] == pytest.approx(1 - 0.9 * 9 / 18)
    assert lr_multiplier(TrainConfig.layered({"max_steps": 100, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "schedule": "wsd"}).finalize(1, 64))(100) == pytest.approx(0.1)


def test_constant_schedule_and_scheduler_drives_optimizer():
    assert lrs(schedule="constant")[10:] == [1.0] * 90
    cfg = TrainConfig.layered({"max_steps": 20, "lr": 0.5, "warmup_steps": 4}).finalize(1, 64)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])


def test_no_weight_decay_on_embeddings_norms_and_biases():
    torch.manual_seed(0)
    model = build_model(make_model_config(dict(TINY_MODEL, vocab_size=64, tie_word_embeddings=False, norm="wiola_rmsnorm")))
    model.register_parameter("bias_probe", torch.nn.Parameter(torch.zeros(3)))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in skipped and "bias_probe" in skipped
    assert any(n.endswith("input_layernorm.weight") for n in skipped) and any(n.endswith(".offset") for n in skipped)
    assert "lm_head.weight" in decayed and any(n.endswith("q_proj.weight") for n in decayed)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decayed) + len(skipped) == len(list(model.parameters()))
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95) and not opt.defaults["fused"]


def test_option_layers_and_validation():
    cfg = TrainConfig.layered({"lr": 1e-3, "seed": 1}, {"lr": 2e-3, "seed": None}, {"batch_size": 16})
    assert (cfg.lr, cfg.seed, cfg.batch_size) == (2e-3, 1, 16)
    done = cfg.finalize(world_size=2, max_positions=128)
    assert (done.seq_len, done.micro_batch_size, done.min_lr, done.grad_accum_steps(2)) == (128, 8, 2e-4, 1)
    with pytest.raises(WiolaError, match="multiple of --micro-batch-size 3"):
        TrainConfig(batch_size=16, micro_batch_size=3).finalize(1, 64)
    with pytest.raises(WiolaError, match="exceeds the model's max_position_embeddings 64"):
        TrainConfig(seq_len=65).finalize(1, 64)
    with pytest.raises(WiolaError, match="unknown training option 'lrr'"):
        TrainConfig.layered({"lrr": 1})


def test_overrides_and_config_sources(tmp_path):
    assert parse_overrides(["hidden_size=64", "mlp=swiglu", "atm_layers=[1, 2]", "tie_word_embeddings=false", "rope_theta=5e5", "x=None"]) == {
        "hidden_size": 64, "mlp": "swiglu", "atm_layers": [1, 2], "tie_word_embeddings": False, "rope_theta": 5e5, "x": None}
    with pytest.raises(WiolaError, match="key=value"):
        parse_overrides(["hidden_size"])
    preset = make_model_config("wiola-nano", {"num_hidden_layers": 2})
    assert (preset.model_type, preset.hidden_size, preset.num_hidden_layers, preset.mlp) == ("wiola", 256, 2, "butterfly")
    with pytest.raises(WiolaError, match="did you mean 'wiola-nano'"):
        make_model_config("wiola-nanoo")
    with pytest.raises(WiolaError, match="invalid model config: mlp='mystery'"):
        make_model_config(dict(TINY_MODEL), {"mlp": "mystery"})
    llama = make_model_config({"model_type": "llama", **TINY_MODEL, "vocab_size": 64})
    assert type(build_model(llama)).__name__ == "LlamaForCausalLM"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  preset: wiola-nano\n  hidden_size: 128\ntrain:\n  lr: 0.001\n")
    spec, train = split_config_source(str(yaml_file))
    assert spec == {"preset": "wiola-nano", "hidden_size": 128} and train == {"lr": 0.001}
    assert make_model_config(spec).hidden_size == 128
    with pytest.raises(FileNotFoundError):
        split_config_source(str(tmp_path / "missing.json"))


def test_config_differences_name_fields():
    a = make_model_config(dict(TINY_MODEL)).to_dict()
    b = make_model_config(dict(TINY_MODEL, hidden_size=48, mlp="gelu")).to_dict()
    diffs = config_differences(a, b)
    assert sorted(diffs) == ["head_dim: checkpoint 8 vs requested 12", "hidden_size: checkpoint 32 vs requested 48",
                             'mlp: checkpoint "swiglu" vs requested "gelu"']
    assert config_differences(a, dict(a, transformers_version="0", dtype="bfloat16")) == []
