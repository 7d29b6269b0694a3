"""Cost of `--document-mask` (packed documents kept apart) on one training step, per model family.

    OMP_NUM_THREADS=2 python benchmarks/document_mask_bench.py [--batch 8] [--seq 256] [--rounds 5]

For each family (seed-style wiola-nano, paper-style with ATM, all-off llama-nano; 2 layers each so the
CPU run is short) it times a forward+backward step on the same batch with plain causal attention and with
the document mask (position_ids restarting after each eos, documents of 20-200 tokens), alternating the
two in every round and keeping each one's best round. Prints seconds per step and the ratio."""

from __future__ import annotations

import argparse
import time

import torch

from wiola import WiolaConfig, WiolaForCausalLM
from wiola.train.batches import document_positions

FAMILIES = {
    "seed (wiola-nano)": dict(preset="wiola-nano"),
    "paper (srpe+gcla+atm+dsff, nano width)": dict(preset="wiola-nano", position_encoding="srpe", attention_gate="none",
                                                    cross_layer_context="gcla", token_merging="atm", mlp="dsff",
                                                    intermediate_size=256, dsff_wide_size=1024, norm="wiola_rmsnorm",
                                                    num_key_value_heads=4),
    "all-off (llama-nano)": dict(preset="llama-nano"),
}


def batch(b: int, t: int, vocab: int, eos: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    for row in ids:
        i = int(torch.randint(20, 200, (1,), generator=g))
        while i < t:
            row[i] = eos
            i += int(torch.randint(20, 200, (1,), generator=g))
    return ids


def step_time(model, ids, positions) -> float:
    start = time.perf_counter()
    out = model(ids, labels=ids, position_ids=positions, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq}, {args.layers} layers")
    print(f"{'family':42} {'causal s/step':>14} {'doc-mask s/step':>16} {'ratio':>7}")
    for name, spec in FAMILIES.items():
        spec = dict(spec)
        config = WiolaConfig.from_preset(spec.pop("preset"), vocab_size=8192, num_hidden_layers=args.layers,
                                         max_position_embeddings=max(1024, args.seq), **spec)
        torch.manual_seed(0)
        model = WiolaForCausalLM(config).train()
        ids = batch(args.batch, args.seq, 8192, config.eos_token_id or 2)
        positions = document_positions(ids, config.eos_token_id or 2)
        best = {"causal": float("inf"), "doc": float("inf")}
        step_time(model, ids, None), step_time(model, ids, positions)  # warm-up
        for _ in range(args.rounds):
            best["causal"] = min(best["causal"], step_time(model, ids, None))
            best["doc"] = min(best["doc"], step_time(model, ids, positions))
        print(f"{name:42} {best['causal']:14.3f} {best['doc']:16.3f} {best['doc'] / best['causal']:7.2f}")


if __name__ == "__main__":
    main()
