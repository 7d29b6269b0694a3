"""ATM speed (issue: causal Adaptive Token Merging): run on a CUDA GPU; prints two tables.

1. One attention layer of the `wiola-120m` shape with merging forced to μ ≈ 0.5 (threshold −1: every
   other edge merges) against the same layer without merging, forward and forward+backward, at
   T ∈ {1024, 4096}.
2. Training tokens/s of `wiola-120m` with merging on (threshold −1 and the preset's 0.92) against off.

    python benchmarks/atm_bench.py [--device cuda] [--batch 8] [--steps 10]

On CPU it runs at toy sizes (`--tiny`) only to check that it works; those times mean nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from wiola import WiolaConfig
from wiola.bench import train_speed
from wiola.modeling_wiola import StepInfo, WiolaAttention, WiolaForCausalLM
from wiola.components_wiola import WiolaRotaryEmbedding


def time_layer(config: WiolaConfig, layer_idx: int, batch: int, seq: int, device, backward: bool, reps: int = 10) -> float:
    """Median seconds of one WiolaAttention call (plus backward) on random inputs, bf16 autocast on CUDA."""
    torch.manual_seed(0)
    attn = WiolaAttention(config, layer_idx).to(device)
    rotary = WiolaRotaryEmbedding(config).to(device)
    x = torch.randn(batch, seq, config.hidden_size, device=device, requires_grad=backward)
    real = torch.ones(batch, seq, dtype=torch.bool, device=device)
    cum = real.long().cumsum(1)
    step = StepInfo(real=real, cum_real=cum, count=cum[..., None].float(), padded=False, mask=None, is_causal=True)
    pos = (cum - 1)
    times = []
    for i in range(reps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cos, sin = rotary(pos, torch.bfloat16 if device.type == "cuda" else torch.float32)
            out, _ = attn(x, cos, sin, step)
        if backward:
            out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke run)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    device = torch.device(args.device)
    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=256, intermediate_size=64, dsff_wide_size=128) if args.tiny else {}
    lengths = (64, 128) if args.tiny else (1024, 4096)
    merged = WiolaConfig.from_preset("wiola-120m", atm_threshold=-1.0, max_position_embeddings=max(lengths), **shape)
    plain = WiolaConfig.from_preset("wiola-120m", token_merging="none", max_position_embeddings=max(lengths), **shape)
    layer = merged.merge_layers[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# ATM layer attention on {name}, torch {torch.__version__}, batch {args.batch}, layer {layer}, μ = 0.5")
    print("| T | pass | merging (ms) | no merging (ms) | ratio |\n|---|---|---:|---:|---:|")
    for seq in lengths:
        batch = max(1, args.batch * 1024 // seq) if not args.tiny else 2
        for backward in (False, True):
            t_on = time_layer(merged, layer, batch, seq, device, backward)
            t_off = time_layer(plain, layer, batch, seq, device, backward)
            print(f"| {seq} | {'fwd+bwd' if backward else 'fwd'} | {t_on * 1e3:.2f} | {t_off * 1e3:.2f} | {t_on / t_off:.2f} |")
    seq = 128 if args.tiny else 1024
    batch = 2 if args.tiny else 16
    print(f"\n# wiola-120m training, batch {batch}×{seq}\n| merging | tokens/s | ratio to off |\n|---|---:|---:|")
    rows = {}
    for label, cfg in (("off", plain), ("on, τ=0.92", WiolaConfig.from_preset("wiola-120m", **shape)), ("on, τ=−1 (μ=0.5)", merged)):
        rows[label] = train_speed(WiolaForCausalLM(cfg), batch, seq, args.steps, 3, device, compile=False)["tokens_per_s"]
        print(f"| {label} | {rows[label]:,.0f} | {rows[label] / rows['off']:.2f} |")


if __name__ == "__main__":
    main()
