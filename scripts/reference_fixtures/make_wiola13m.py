"""Generate reference fixtures from the PyPI package ``wiola13m==1.0.1``.

Runs INSIDE a throwaway virtual environment that has ``wiola13m==1.0.1`` and
``transformers>=4.40,<4.46`` installed (see ``run_wiola13m.sh``). It never runs
in CI and nothing in the ``wiola`` library imports it. It only *uses* the
reference package (builds, saves, reloads and runs its models); no reference
code is copied here.

For every fixture in ``FIXTURES`` it writes ``<out>/<name>/``:

* ``config.json``, ``generation_config.json`` and ``model.safetensors`` (or
  ``pytorch_model.bin``), exactly as the reference ``save_pretrained`` writes them;
* ``reference.safetensors``: ``input_ids`` (int64, [2, 16], unpadded) and
  ``logits`` (fp32, [2, 16, vocab]), eval mode, computed by the model reloaded
  with the reference ``from_pretrained``;
* ``greedy.json``: a 6-token prompt and 20 greedily generated tokens;
* ``meta.json``: versions, seeds, what the fixture covers, self-checks and
  sensitivity numbers (how much the logits move when one switch is changed).

Usage: python make_wiola13m.py [--out tests/fixtures/wiola13m]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers
import wiola13m
from safetensors.torch import save_file
from wiola13m import WiolaConfig, WiolaForCausalLM

VOCAB = 256
BATCH, SEQ = 2, 16
PROMPT_LEN, NEW_TOKENS = 6, 20

# name -> (reference config kwargs, save as safetensors?, seed, what it covers)
FIXTURES: dict[str, tuple[dict, bool, int, str]] = {
    "gsa_tied": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             spiral_alpha=0.05, gate_pre_rope=True, use_attention_gate=True, tie_word_embeddings=True),
        True, 1001,
        "Nano-like defaults: spiral alpha 0.05, GSA gate from pre-RoPE queries, tied head, d_inner = 2d",
    ),
    "deep_postrope_untied": (
        dict(hidden_size=64, intermediate_size=64, num_hidden_layers=5, num_attention_heads=8,
             spiral_alpha=0.3, gate_pre_rope=False, use_attention_gate=True, tie_word_embeddings=False),
        True, 1002,
        "5 layers, d_h 8, large spiral alpha 0.3, GSA gate from post-RoPE queries, untied head, d_inner = d",
    ),
    "alpha0_nogate_bin": (
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
             spiral_alpha=0.0, use_attention_gate=False, tie_word_embeddings=True,
             rope_theta=500.0, rms_norm_eps=1e-5, pad_token_id=0),
        False, 1003,
        "plain RoPE (alpha 0), no gate (no gate_* weights), tied head, d_h 32, rope_theta 500, eps 1e-5, "
        "pad_token_id 0; saved as pytorch_model.bin (holds lm_head.weight too)",
    ),
    "alpha0_gate_untied": (
        dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             spiral_alpha=0.0, gate_pre_rope=True, use_attention_gate=True, tie_word_embeddings=False),
        True, 1004,
        "plain RoPE (alpha 0) with the GSA gate (pre-RoPE), untied head",
    ),
}


def perturb_(model: WiolaForCausalLM, seed: int) -> None:
    """Move every parameter away from the reference's trivial/structured init.

    The reference init is trunc-normal(0.02) for linears and embeddings, ones for
    norms and zeros for the gate bias; at that scale the gate is ~0.5 everywhere
    and attention is nearly uniform, so a wrong implementation could still match.
    Noise is added in place, so tied weights stay tied.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared (tied) tensors appear once
            if "gate_fc" in name:
                std = 1.0  # make the gate depend strongly on its content input
            elif "layernorm" in name or name.endswith("norm.weight"):
                std = 0.2  # norms: 1 + N(0, 0.2)
            elif "embed_tokens" in name or "lm_head" in name:
                std = 0.15  # small enough that a tied head does not just echo the last token
            else:
                std = 0.08  # projections: q/k scores O(1), not uniform attention
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def cached_logits(model, ids, split):
    out = model(input_ids=ids[:, :split], use_cache=True)
    pkv, chunks = out.past_key_values, [out.logits]
    for t in range(split, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        chunks.append(out.logits)
    return torch.cat(chunks, dim=1).float()


@torch.no_grad()
def argmax_loop(model, prompt, n):
    x, margins = prompt.clone(), []
    for _ in range(n):
        last = logits_of(model, x)[:, -1]
        top2 = last.topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
        nxt = last.argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x[:, prompt.shape[1]:], min(margins)


@torch.no_grad()
def sensitivity(model, ids, ref_logits):
    """max |Δlogits| when one reference switch is changed on the same weights."""
    out = {}
    attns = [layer.self_attn for layer in model.model.layers]
    cfg = model.config

    def delta():
        return float((logits_of(model, ids) - ref_logits).abs().max())

    # alpha: rebuild every layer's inv_freq with a different alpha
    saved = [a.rotary_emb.inv_freq.clone() for a in attns]
    other_alpha = 0.05 if cfg.spiral_alpha == 0.0 else 0.0
    for a in attns:
        a.rotary_emb.inv_freq = type(a.rotary_emb)(a.head_dim, cfg.rope_theta, other_alpha).inv_freq
    out[f"spiral_alpha->{other_alpha}"] = delta()
    for a, s in zip(attns, saved):
        a.rotary_emb.inv_freq = s
    if cfg.use_attention_gate:
        for a in attns:
            a.gate_pre_rope = not a.gate_pre_rope
        out[f"gate_pre_rope->{not cfg.gate_pre_rope}"] = delta()
        for a in attns:
            a.gate_pre_rope = not a.gate_pre_rope
        for a in attns:
            a.use_attention_gate = False
        out["gate_off"] = delta()
        for a in attns:
            a.use_attention_gate = True
    assert float((logits_of(model, ids) - ref_logits).abs().max()) == 0.0
    return out


def make_one(name: str, out_root: Path) -> dict:
    kwargs, safetensors, seed, covers = FIXTURES[name]
    torch.manual_seed(seed)
    cfg = WiolaConfig(vocab_size=VOCAB, **kwargs)
    model = WiolaForCausalLM(cfg)
    perturb_(model, seed + 1)
    model.eval()

    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=safetensors)

    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=g)

    in_memory = logits_of(model, ids)
    # Reference logits come from the checkpoint as the reference loads it.
    loaded = WiolaForCausalLM.from_pretrained(d).eval()
    logits = logits_of(loaded, ids)
    reload_diff = float((logits - in_memory).abs().max())
    assert reload_diff == 0.0, reload_diff
    if cfg.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    cache_diff = float((cached_logits(loaded, ids, SEQ // 2) - logits).abs().max())
    assert cache_diff < 1e-4, cache_diff

    # every parameter influences the logits (non-zero gradient)
    loaded.zero_grad()
    w = torch.randn(logits.shape, generator=g)
    with torch.enable_grad():
        (loaded(input_ids=ids, use_cache=False).logits * w).sum().backward()
    grad_norms = {n: float(p.grad.norm()) for n, p in loaded.named_parameters()}
    dead = [n for n, v in grad_norms.items() if not v > 0]
    assert not dead, dead
    loaded.zero_grad()

    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(d / "reference.safetensors"))

    with torch.no_grad():
        gen = loaded.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=cfg.eos_token_id, eos_token_id=None)[:, PROMPT_LEN:]
    loop, margin = argmax_loop(loaded, prompt, NEW_TOKENS)
    # a correct port may differ by ~1e-5 in the logits; greedy must not hinge on a near-tie
    assert margin > 1e-3, f"{name}: greedy top-2 margin {margin}; pick another seed"
    gen_matches_loop = bool(torch.equal(gen, loop))
    (d / "greedy.json").write_text(json.dumps({
        "prompt": prompt[0].tolist(),
        "generated": loop[0].tolist(),
        "method": "argmax loop over full no-cache forwards (fp32, eval); the reference "
                  "generate(do_sample=False, eos_token_id=None) with its KV cache gives "
                  + ("the same tokens" if gen_matches_loop else f"DIFFERENT tokens {gen[0].tolist()}"),
        "reference_generate_matches": gen_matches_loop,
        "min_top2_logit_margin": margin,
    }, indent=1) + "\n")

    meta = {
        "package": f"wiola13m=={wiola13m.__version__}",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "covers": covers,
        "config_kwargs": {"vocab_size": VOCAB, **kwargs},
        "checkpoint": "model.safetensors" if safetensors else "pytorch_model.bin",
        "seed": {"init": seed, "perturb": seed + 1, "inputs": seed + 2},
        "perturbation": "after reference init, in place: gate_fc* += N(0,1); norm weights += N(0,0.2); "
                        "embed/lm_head += N(0,0.15); other linears += N(0,0.08)",
        "num_parameters": sum(p.numel() for p in loaded.parameters()),
        "checks": {
            "reload_max_abs_diff": reload_diff,
            "cached_decode_vs_full_max_abs_diff": cache_diff,
            "min_param_grad_norm": min(grad_norms.values()),
            "generate_matches_argmax_loop": gen_matches_loop,
        },
        "sensitivity_max_abs_logit_change": sensitivity(loaded, ids, logits),
        "logits_abs_max": float(logits.abs().max()),
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/wiola13m")
    ap.add_argument("--only", nargs="*", default=None, help="fixture names (default: all)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.only or FIXTURES:
        meta = make_one(name, out_root)
        print(name, json.dumps({k: meta[k] for k in ("num_parameters", "checks", "sensitivity_max_abs_logit_change")}))


if __name__ == "__main__":
    main()
