"""Generate reference fixtures from the PyPI package ``wiola==0.1.1``.

Runs INSIDE a throwaway virtual environment that has the reference package and
its pinned transformers (4.46.x) installed; see ``run_wiola.sh``. It is not run
by CI and nothing in ``src/`` imports it. It only *runs* the reference package to
produce data: tiny random-init models, saved with the reference
``save_pretrained``, plus their eval-mode fp32 logits and a greedy continuation.

Output, one directory per fixture under ``tests/fixtures/wiola/<name>/``:

* ``config.json`` (+ ``generation_config.json``) and ``model.safetensors`` or
  ``pytorch_model.bin``: the checkpoint as the reference ``save_pretrained`` writes it;
* ``reference.safetensors``: ``input_ids`` [2, 16] int64 and ``logits`` [2, 16, V] fp32
  (eval mode, unpadded, no attention mask, one full forward);
* ``greedy.json``: 20 greedily generated tokens after a short prompt;
* ``fixture.json``: how the fixture was made (seed, noise, versions, notes).

Usage: python make_wiola.py [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import wiola
from wiola import WiolaConfig, WiolaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "wiola"

BATCH, SEQ = 2, 16
PROMPT_LEN, NEW_TOKENS = 6, 20
MIN_MARGIN = 0.01

# Noise added to every parameter after the reference init, before saving, so that
# trivial inits (norm weight 1, offset 0, blend logit = gcla_gate_init, zero pad
# embedding row) cannot hide a mistake in a converter or a re-implementation.
NOISE = {
    "embedding": 0.06,  # embed_tokens (and lm_head when tied) (init N(0, 0.02))
    "matrix": 0.1,  # every other Linear weight (init N(0, 0.02)); large so that tiny
    # tied models do not just echo the last token in greedy decoding
    "norm_weight": 0.1,  # WiolaRMSNorm gamma (init 1)
    "norm_offset": 0.02,  # WiolaRMSNorm delta (init 0)
    "blend_logit": 0.5,  # GCLA phi (init gcla_gate_init)
}

# name -> (seed, config overrides, save format, comment)
FIXTURES = {
    "gqa2_tied_atm_l6": (
        1001,
        dict(
            hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            dsff_narrow_size=32, dsff_wide_size=64, atm_enabled=True, gcla_lookback=2,
            tie_word_embeddings=True,
        ),
        "safetensors",
        "GQA n_rep=2, d_h=8, 6 layers, tied, ATM enabled in config (inactive in eval), "
        "default SRPE/GCLA hyper-parameters.",
    ),
    "gqa4_untied_noatm_l5": (
        1002,
        dict(
            hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1,
            dsff_narrow_size=24, dsff_wide_size=64, atm_enabled=False, gcla_lookback=3,
            gcla_gate_init=-1.0, srpe_theta=1000.0, srpe_spiral_divisor=4,
            srpe_radial_amplitude=0.25, srpe_radial_frequency=0.3, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        "safetensors",
        "GQA n_rep=4 (one kv head), d_h=8, 5 layers, untied, ATM disabled, lookback 3, "
        "non-default SRPE (theta, k_s, a_s, f_s), eps and gate init so every field matters; "
        "d_A=24 < d.",
    ),
    "gqa4_tied_atm_bin_l7": (
        1003,
        dict(
            hidden_size=32, num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=2,
            dsff_narrow_size=40, dsff_wide_size=48, atm_enabled=True, atm_threshold=0.5,
            gcla_lookback=2, gcla_gate_init=0.0, tie_word_embeddings=True,
        ),
        "bin",
        "GQA n_rep=4, d_h=4, 7 layers, tied, ATM enabled (threshold 0.5), saved as "
        "PyTorch pytorch_model.bin (safe_serialization=False).",
    ),
    "mha_untied_noatm_l5": (
        1004,
        dict(
            hidden_size=32, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2,
            dsff_narrow_size=32, dsff_wide_size=64, atm_enabled=False, gcla_lookback=1,
            tie_word_embeddings=False,
        ),
        "safetensors",
        "MHA (n_rep=1), d_h=16, 5 layers, untied, ATM disabled, lookback 1.",
    ),
    "quirk_lookback0_l5": (
        1005,
        dict(
            hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
            dsff_narrow_size=32, dsff_wide_size=64, atm_enabled=True, gcla_lookback=0,
            tie_word_embeddings=True,
        ),
        "safetensors",
        "gcla_lookback=0: the reference slices prefix_means[-0:], i.e. ALL previous "
        "layers, so this equals lookback >= num_hidden_layers - 1 (not 'no context').",
    ),
}

BASE = dict(vocab_size=256, max_position_embeddings=128)


def perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared (tied) tensors appear once
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("blend_logit"):
                p.add_(NOISE["blend_logit"] * noise)
            elif name.endswith(".offset"):
                p.add_(NOISE["norm_offset"] * noise)
            elif name.endswith("embed_tokens.weight"):
                p.add_(NOISE["embedding"] * noise)
            elif p.ndim == 1:
                p.add_(NOISE["norm_weight"] * noise)
            else:
                p.add_(NOISE["matrix"] * noise)


@torch.no_grad()
def argmax_loop(model, prompt: torch.Tensor, n: int):
    """Plain greedy loop over full forwards (no cache); returns tokens and margins."""
    ids = prompt
    margins = []
    for _ in range(n):
        logits = model(ids, use_cache=False).logits[:, -1].float()
        top2 = logits.topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, margins


def make_one(name: str, out_root: Path) -> dict:
    seed, overrides, fmt, comment = FIXTURES[name]
    torch.manual_seed(seed)
    config = WiolaConfig(**BASE, **overrides)
    model = WiolaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    perturb(model, gen)
    model.eval()

    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=(fmt == "safetensors"))
    # Defensive: never keep reference source files next to the checkpoint.
    for f in out.glob("*.py"):
        f.unlink()

    # Eval-mode fp32 logits of one full forward on an unpadded batch, computed with
    # the checkpoint reloaded by the reference from_pretrained (must be bit-identical
    # to the in-memory model).
    g = torch.Generator().manual_seed(seed + 2)
    input_ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=g)
    reloaded = WiolaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits_mem = model(input_ids, use_cache=False).logits.float()
    model = reloaded
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits.float().contiguous()
    assert torch.equal(logits, logits_mem), f"{name}: save/reload round trip changed logits"
    # Parameters that do not influence eval logits (expected: layer 0's k_ctx_proj,
    # v_ctx_proj and blend_logit, since layer 0 has no cross-layer context).
    model.zero_grad(set_to_none=True)
    model(input_ids, use_cache=False).logits.float().square().sum().backward()
    unused = sorted(
        n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
    )
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        # Sanity checks of the reference itself (recorded, not asserted):
        logits_cache = model(input_ids, use_cache=True).logits.float()
        # incremental decode with the reference tuple cache
        step_logits = []
        past = None
        for t in range(SEQ):
            o = model(input_ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = o.past_key_values
            step_logits.append(o.logits.float())
        step_logits = torch.cat(step_logits, dim=1)
        # ATM is training-only: eval logits are identical with it switched off
        model.config.atm_enabled = not model.config.atm_enabled
        logits_atm_flip = model(input_ids, use_cache=False).logits.float()
        model.config.atm_enabled = not model.config.atm_enabled
    save_file(
        {"input_ids": input_ids.contiguous(), "logits": logits},
        str(out / "reference.safetensors"),
        metadata={"producer": "wiola==0.1.1 eval mode fp32, full forward, no attention_mask"},
    )

    # Greedy continuation of a short prompt.
    # Draw prompts until every greedy step has a clear top-1 (margin >= MIN_MARGIN),
    # so that a faithful re-implementation cannot flip a token by rounding.
    for attempt in range(200):
        prompt = torch.randint(3, config.vocab_size, (1, PROMPT_LEN), generator=g)
        loop_ids, margins = argmax_loop(model, prompt, NEW_TOKENS)
        if min(margins) >= MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no prompt with greedy margin >= {MIN_MARGIN}")
    gen_ids, gen_error = None, None
    try:
        model.generation_config.eos_token_id = None  # never stop early
        model.generation_config.pad_token_id = config.pad_token_id
        with torch.no_grad():
            gen_ids = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                do_sample=False, num_beams=1,
            )
    except Exception as e:  # noqa: BLE001
        gen_error = f"{type(e).__name__}: {e}"
    generate_matches = gen_ids is not None and torch.equal(gen_ids, loop_ids)
    greedy = {
        "prompt": prompt[0].tolist(),
        "tokens": loop_ids[0, PROMPT_LEN:].tolist(),
        "sequence": loop_ids[0].tolist(),
        "method": "argmax loop over full forwards (use_cache=False), eval mode fp32",
        "reference_generate_tokens": None if gen_ids is None else gen_ids[0, PROMPT_LEN:].tolist(),
        "reference_generate_error": gen_error,
        "reference_generate_matches_loop": generate_matches,
        "generate_call": "model.generate(prompt, attention_mask=ones, max_new_tokens=20, "
        "do_sample=False, num_beams=1) with generation_config.eos_token_id=None",
        "min_top1_top2_margin": min(margins),
        "prompt_attempt": attempt,
    }
    (out / "greedy.json").write_text(json.dumps(greedy, indent=1) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "name": name,
        "comment": comment,
        "seed": seed,
        "config_overrides": {**BASE, **overrides},
        "save_format": fmt,
        "noise_std_added_after_init": NOISE,
        "num_parameters_unique": n_params,
        "parameters_without_effect_on_eval_logits": unused,
        "checks": {
            "max_abs_logits": float(logits.abs().max()),
            "logits_std": float(logits.std()),
            "use_cache_true_vs_false_max_diff": float((logits_cache - logits).abs().max()),
            "incremental_decode_vs_full_max_diff": float((step_logits - logits).abs().max()),
            "eval_logits_atm_enabled_flipped_max_diff": float((logits_atm_flip - logits).abs().max()),
        },
        "versions": {
            "wiola": wiola.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    (out / "fixture.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None, help="fixture names to (re)generate")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    # wiola 0.1.1 registers its classes for auto_map at import time; with that,
    # save_pretrained calls transformers' custom_object_save, which crashes on
    # the package's sub-package relative imports ("components.normalization.py"
    # not found) on transformers 4.46.3. Unregister so save_pretrained works; the
    # checkpoint then has no auto_map (and no copied reference source).
    WiolaConfig._auto_class = None
    WiolaForCausalLM._auto_class = None
    wiola.WiolaModel._auto_class = None

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in args.only or FIXTURES:
        info = make_one(name, args.out)
        summary[name] = info["checks"]
        print(name, json.dumps(info["checks"]))
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"total fixture bytes: {total}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
