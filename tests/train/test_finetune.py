"""Fine-tuning through the CLI: --init-from starts from trained weights, --lora trains adapters that
resume exactly, `wiola merge` saves a plain model with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from wiola.cli import main

from .tinyrun import FAST, read_log, train_losses


def run(config, data, out, *extra):
    return main(["train", str(config), str(data), str(out), *FAST, *map(str, extra)])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, dataset, model_config):
    """A tiny model trained for 60 steps: its loss has fallen far below the random-init loss."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert run(model_config, dataset, out, "--max-steps", 60, "--eval-every", 60) == 0
    return out


def test_init_from_continues_from_the_checkpoint_loss(base_run, dataset, tmp_path):
    final = train_losses(base_run)[60]
    assert run(base_run, dataset, tmp_path / "ft", "--max-steps", 1, "--eval-every", 1, "--init-from", base_run) == 0
    assert run(base_run, dataset, tmp_path / "rnd", "--max-steps", 1, "--eval-every", 1) == 0
    first, random_first = train_losses(tmp_path / "ft")[1], train_losses(tmp_path / "rnd")[1]
    assert abs(first - final) < 0.35, (first, final)  # a different batch, the same model
    assert random_first > first + 1.5, (random_first, first)  # a model dir as CONFIG alone: architecture only
    # a checkpoint directory works too, and the weights equal the checkpoint's at step 0
    ckpt = base_run / "checkpoints" / "final"
    assert run(ckpt, dataset, tmp_path / "ft2", "--max-steps", 1, "--eval-every", 1, "--init-from", ckpt) == 0
    assert train_losses(tmp_path / "ft2")[1] == pytest.approx(first, abs=1e-6)


def test_init_from_errors_are_one_line(base_run, dataset, tmp_path, capsys):
    assert run(base_run, dataset, tmp_path / "a", "--max-steps", 1, "--init-from", tmp_path / "nowhere") == 2
    assert "checkpoint not found" in capsys.readouterr().err
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({**json.loads((base_run / "config.json").read_text()), "intermediate_size": 96}))
    assert run(wide, dataset, tmp_path / "b", "--max-steps", 1, "--init-from", base_run) == 2
    err = capsys.readouterr().err
    assert "weights do not fit the model" in err and len(err.strip().splitlines()) == 1
    assert run(base_run, dataset, tmp_path / "c", "--max-steps", 1, "--lora") == 2
    assert "--init-from" in capsys.readouterr().err
    assert run(base_run, dataset, tmp_path / "d", "--max-steps", 1, "--init-from", base_run, "--lora", "--lora-targets", "qq_proj") == 2
    assert "names no linear layer" in capsys.readouterr().err


def test_lora_trains_adapters_only_resumes_exactly_and_merges(base_run, dataset, tmp_path, capsys):
    lora = ["--init-from", base_run, "--lora", "--lora-rank", 4, "--schedule", "constant", "--eval-every", 100, "--save-every", 100]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(base_run, dataset, straight, "--max-steps", 4, *lora) == 0
    assert run(base_run, dataset, split, "--max-steps", 2, *lora) == 0
    assert main(["train", str(base_run), str(dataset), str(split), *FAST, "--max-steps", "4", "--resume"]) == 0
    a, b = train_losses(straight), train_losses(split)
    assert [a[s] for s in (1, 2, 3, 4)] == pytest.approx([b[s] for s in (1, 2, 3, 4)], abs=1e-6)
    assert a[4] != pytest.approx(a[1], abs=1e-4)  # the adapters do train
    # only the adapters train: rank 4 on 7 projections of 2 layers of a hidden-32 model
    start = read_log(straight)[0]
    config = json.loads((base_run / "config.json").read_text())
    d, kv, inter = config["hidden_size"], config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"], config["intermediate_size"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]  # (in, out) of q k v o gate up down
    assert start["trainable_parameters"] == config["num_hidden_layers"] * sum(4 * (i + o) for i, o in shapes)
    assert (straight / "adapter_model.safetensors").is_file() and not (straight / "model.safetensors").exists()
    # changing the adapter layout on resume is refused
    assert main(["train", str(base_run), str(dataset), str(split), *FAST, "--max-steps", "6", "--resume", "--lora-rank", "8"]) == 2
    assert "lora_rank" in capsys.readouterr().err

    # merge: a plain model directory whose logits equal the PEFT model merged in memory
    from transformers import AutoModelForCausalLM

    from wiola.finetune import load_lora_model

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(straight), str(merged_dir)]) == 0
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "tokenizer.json").is_file()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model, _ = load_lora_model(straight)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        in_memory = peft_model.merge_and_unload()(input_ids=ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_run).eval()(input_ids=ids).logits
    assert torch.equal(reloaded, in_memory)
    assert (unmerged - in_memory).abs().max() < 1e-4
    assert (base - in_memory).abs().max() > 1e-3  # the merge changed the weights
    torch.save({"ids": ids, "logits": in_memory}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["wiola"] = None  # trust_remote_code must work without the package
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r}, trust_remote_code=True).eval()
        assert "wiola" not in type(model).__module__.split(".")[0]
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            got = model(input_ids=ref["ids"]).logits
        print("max diff", (got - ref["logits"]).abs().max().item())
        assert torch.equal(got, ref["logits"])
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a LoRA run cannot be --init-from; merging a full run, or into a non-empty dir, is refused
    assert run(base_run, dataset, tmp_path / "x", "--max-steps", 1, "--init-from", straight) == 2
    assert "merge it first" in capsys.readouterr().err
    assert main(["merge", str(base_run), str(tmp_path / "y")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    assert main(["merge", str(straight), str(merged_dir)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_default_lora_targets_cover_every_family():
    from wiola import WiolaConfig, WiolaForCausalLM
    from wiola.finetune import default_targets

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                 vocab_size=64, max_position_embeddings=32)
    assert default_targets(WiolaForCausalLM(WiolaConfig(**small, mlp="swiglu"))) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "bypass_proj" in default_targets(WiolaForCausalLM(WiolaConfig(**small, mlp="butterfly")))
    dsff = default_targets(WiolaForCausalLM(WiolaConfig(**small, mlp="dsff", dsff_wide_size=64)))
    assert {"wide_up_proj", "wide_down_proj", "fusion_proj", "gate_proj"} <= set(dsff)
    assert "output_gate_proj" in default_targets(WiolaForCausalLM(WiolaConfig(**small, cross_layer_context="gcla")))


def test_lora_run_records_its_base_and_refuses_a_changed_one(base_run, dataset, tmp_path, capsys):
    """Issue 26 item 2: an adapter only means something on the weights it was trained on. Changing the
    --init-from folder afterwards (the base run resumed in place, say) used to change generate/eval output,
    resume and merge silently; now each refuses in one line unless --allow-changed-base."""
    import shutil

    from safetensors.torch import load_file, save_file

    from wiola.finetune import BASE_RECORD, weights_sha256

    base = tmp_path / "base"  # a copy: the module's base_run stays as it is
    shutil.copytree(base_run / "checkpoints" / "final", base)
    out = tmp_path / "lora"
    lora = ["--init-from", base, "--lora", "--lora-rank", 4, "--eval-every", 100, "--save-every", 2]
    assert run(base, dataset, out, "--max-steps", 2, *lora) == 0
    record = json.loads((out / BASE_RECORD).read_text())
    assert record == {"path": str(base.resolve()), "weights_sha256": weights_sha256(base)}
    assert json.loads((out / "checkpoints" / "latest" / BASE_RECORD).read_text()) == record
    gen = ["generate", str(out), "the king", "--greedy", "--max-new-tokens", "8", "--device", "cpu"]
    assert main(gen) == 0
    before = capsys.readouterr().out

    weights = load_file(base / "model.safetensors")  # the base changes in place
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in weights.items()}, base / "model.safetensors")

    def refused(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "weights changed" in err and "--allow-changed-base" in err, err

    refused(gen)
    refused(["eval", str(out), str(dataset), "--device", "cpu", "--max-batches", "1", "--seq-len", "16"])
    refused(["merge", str(out), str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
    resume = ["train", str(base), str(dataset), str(out), *FAST, "--max-steps", "4", "--resume"]
    refused(resume)
    refused(["card", str(out), "--output", str(tmp_path / "card.md")])  # its sample loads the model
    refused(["serve", str(out), "--port", "0"])  # refused before it listens

    # the override goes on, with a warning, on the base as it is now
    assert main([*gen, "--allow-changed-base"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and captured.out != before
    assert main(["merge", str(out), str(tmp_path / "merged"), "--allow-changed-base"]) == 0
    assert main(["card", str(out), "--output", str(tmp_path / "card.md"), "--allow-changed-base"]) == 0
    assert main([*resume, "--allow-changed-base"]) == 0
    assert any(r.get("event") == "base_changed" for r in read_log(out))
    assert json.loads((out / BASE_RECORD).read_text())["weights_sha256"] == weights_sha256(base)  # recorded anew
    capsys.readouterr()
    assert main(gen) == 0  # the adapter trained on since then fits the new base
