"""Quality of int8 decoding (docs/benchmarks.md, "int8 quality"): perplexity on a prepared validation split
and greedy agreement, fp32 against `wiola.quantize.quantize_int8` (the PyTorch backend; torchao's too when
installed).

    OMP_NUM_THREADS=1 python benchmarks/int8_quality.py --checkpoint runs/main-job --data data/shakespeare \
        --windows 64 --seq-len 256 --prompts 8 --new-tokens 256

Perplexity: exp of the mean next-token loss over the same `--windows` non-overlapping windows of
`--seq-len` tokens from the start of the split, for every model. Greedy agreement: from `--prompts`
validation prompts of 32 tokens (evenly spaced through the split), each model decodes `--new-tokens`
greedily on `StaticDecoder` (eager); reported: the share of positions where the int8 tokens equal the
fp32 ones, and the mean position of the first difference.
"""

from __future__ import annotations

import argparse
import math

import torch

from wiola.data.loader import TokenDataset
from wiola.decode import StaticDecoder
from wiola.quantize import quantize_int8, torchao_available
from wiola.train.checkpoint import load_for_inference


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, windows: int, seq_len: int, batch: int = 8) -> float:
    total, count = 0.0, 0
    data = tokens[: windows * seq_len].view(windows, seq_len)
    for start in range(0, windows, batch):
        ids = data[start:start + batch]
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.shape[0] * (seq_len - 1)
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, quantized: bool) -> torch.Tensor:
    decoder = StaticDecoder(model, max_cache_len=prompts.shape[1] + new_tokens, compile=False)
    return decoder.generate(prompts, max_new_tokens=new_tokens)[:, prompts.shape[1]:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args(argv)
    model, _, _ = load_for_inference(args.checkpoint, torch.device("cpu"))
    tokens = torch.from_numpy(TokenDataset(args.data, args.split).tokens.astype("int64"))
    stride = (len(tokens) - args.prompt_len) // args.prompts
    prompts = torch.stack([tokens[i * stride:i * stride + args.prompt_len] for i in range(args.prompts)])
    models = {"fp32": model, "int8 (torch)": quantize_int8(model, "torch")}
    if torchao_available():
        models["int8 (torchao)"] = quantize_int8(model, "torchao")
    print(f"# {args.checkpoint}, {args.split} split of {args.data}: {args.windows} windows × {args.seq_len} tokens; "
          f"greedy: {args.prompts} prompts × {args.new_tokens} new tokens")
    print("| model | perplexity | vs fp32 | greedy agreement | mean first difference at |\n|---|---:|---:|---:|---:|")
    reference = None
    base = None
    for name, m in models.items():
        ppl = perplexity(m, tokens, args.windows, args.seq_len)
        out = greedy(m, prompts, args.new_tokens, name != "fp32")
        if reference is None:
            reference, base = out, ppl
            print(f"| {name} | {ppl:.3f} | — | — | — |", flush=True)
            continue
        same = out == reference
        first = [int((~row).nonzero()[0, 0]) if (~row).any() else args.new_tokens for row in same]
        print(f"| {name} | {ppl:.3f} | {ppl / base - 1:+.2%} | {same.float().mean():.1%} | {sum(first) / len(first):.0f} |", flush=True)


if __name__ == "__main__":
    main()
