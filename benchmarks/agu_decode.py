"""AGU's sparse batch-1 decode path against the dense path of the same model (issue: article components).

At batch-1 decoding the zero units of the AGU gate need neither their `W_up` rows nor their `W_down` columns
(docs/architecture.md §6.1); `GatedUnitsMLP` skips them when `agu_sparse_decode` is on. This script times greedy batch-1
decoding (transformers `generate()`, the dynamic cache) with the sparse path on and off, checks that both
give the same tokens, and prints tokens/s and the ratio sparse/dense — the baseline is the dense path of the
very same weights, measured side by side in one process.

Sparsity: `--checkpoint DIR` uses a trained AGU model as it is (its measured sparsity is printed); otherwise a
random model of `--shape` has each layer's β set so that the gate's share of zero units on the prompt is
`--sparsity` (the level a trained model reaches: see docs/article.md).

    OMP_NUM_THREADS=2 python benchmarks/agu_decode.py --shape nano --sparsity 0.6
    OMP_NUM_THREADS=2 python benchmarks/agu_decode.py --checkpoint runs/agu
"""

from __future__ import annotations

import argparse
import time

import torch

from wiola import WiolaConfig, WiolaForCausalLM

SHAPES = {  # SwiGLU-sized AGU models: d, L, H, f
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "nano": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=688),
    "120m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048),
}


def set_sparse(model, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "sparse_decode"):
            m.sparse_decode = on


@torch.no_grad()
def calibrate(model, prompt: torch.Tensor, sparsity: float) -> None:
    """Per layer, β = 2·q_s(|h|): with w_τ = b_τ = 0, τ = β/2, so a share `sparsity` of the gate is zero."""
    captured = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, torch.nn.functional.silu(mod.gate_proj(i[0]))))
             for k, layer in enumerate(model.model.layers)]
    model(prompt)
    for h in hooks:
        h.remove()
    for k, layer in enumerate(model.model.layers):
        q = torch.quantile(captured[k].abs().flatten().float(), sparsity)
        layer.mlp.threshold.threshold_scale.fill_(2 * float(q))


def tokens_per_s(model, prompt, new: int, reps: int) -> tuple[float, torch.Tensor]:
    best, out = 0.0, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        best = max(best, new / (time.perf_counter() - t0))
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--shape", choices=list(SHAPES), default="nano")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        model = WiolaForCausalLM.from_pretrained(args.checkpoint).eval()
        label = args.checkpoint
    else:
        config = WiolaConfig(vocab_size=8192, max_position_embeddings=1024, mlp="agu", **SHAPES[args.shape])
        model = WiolaForCausalLM(config).eval()
        label = f"random {args.shape}-shape AGU model, β calibrated to sparsity {args.sparsity}"
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt))
    if not args.checkpoint:
        calibrate(model, prompt, args.sparsity)
    with torch.no_grad():
        sparsity = model(prompt).activation_sparsity
    mean_sparsity = sum(float(v) for v in sparsity.values()) / len(sparsity)
    print(f"{label}: threads {torch.get_num_threads()}, prompt {args.prompt}, {args.new} new tokens, batch 1, "
          f"measured gate sparsity {mean_sparsity:.3f} (mean over layers)")
    results = {}
    for name, on in (("dense", False), ("sparse", True), ("dense again", False), ("sparse again", True)):
        set_sparse(model, on)
        results[name] = tokens_per_s(model, prompt, args.new, args.reps)
    same = torch.equal(results["dense"][1], results["sparse"][1])
    dense = max(results["dense"][0], results["dense again"][0])
    sparse = max(results["sparse"][0], results["sparse again"][0])
    print(f"  dense path   {dense:8.1f} tokens/s")
    print(f"  sparse path  {sparse:8.1f} tokens/s   ratio sparse/dense {sparse / dense:.2f}x   same tokens: {same}")


if __name__ == "__main__":
    main()
