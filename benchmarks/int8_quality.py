"""Quality of quantized decoding (docs/benchmarks.md, "Quantized quality"): perplexity on a prepared validation
split and greedy agreement, fp32 against every quantized path: PyTorch's int8 (`wiola.quantize.quantize_int8`,
torchao's too when installed) and the ONNX engine's block-wise int8 and int4 weights (onnxruntime MatMulNBits,
`wiola.export.onnx_quant`), with the ONNX engine's fp32 export as a control (its numbers should equal torch's).

    OMP_NUM_THREADS=1 python benchmarks/int8_quality.py --checkpoint runs/main-job --data data/shakespeare \
        --windows 64 --seq-len 256 --prompts 8 --new-tokens 256

Perplexity: exp of the mean next-token loss over the same `--windows` non-overlapping windows of
`--seq-len` tokens from the start of the split, for every model (the ONNX rows teacher-force the step graph
token by token). Greedy agreement: from `--prompts` validation prompts of 32 tokens (evenly spaced through the
split), each path decodes `--new-tokens` greedily on `StaticDecoder`; reported: the share of positions where
its tokens equal the fp32 torch ones, and the mean position of the first difference. `--no-onnx` leaves the
ONNX rows out (they export the model into the engine cache first when it is not there).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from wiola.data.loader import TokenDataset
from wiola.decode import StaticDecoder
from wiola.quantize import quantize_int8, torchao_available
from wiola.train.checkpoint import load_for_inference


def windows_of(tokens: torch.Tensor, windows: int, seq_len: int) -> torch.Tensor:
    return tokens[: windows * seq_len].view(windows, seq_len)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, windows: int, seq_len: int, batch: int = 8) -> float:
    total, count = 0.0, 0
    data = windows_of(tokens, windows, seq_len)
    for start in range(0, windows, batch):
        ids = data[start:start + batch]
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.shape[0] * (seq_len - 1)
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


@torch.no_grad()
def onnx_perplexity(engine, tokens: torch.Tensor, windows: int, seq_len: int, batch: int = 8) -> float:
    """The same windows through the ONNX step graph, one token per step (the graph decodes; it has no loss)."""
    total, count = 0.0, 0
    data = windows_of(tokens, windows, seq_len)
    for start in range(0, windows, batch):
        ids = data[start:start + batch]
        run = engine.start(ids.shape[0], seq_len)
        logits = run.prefill(ids[:, :1], torch.ones_like(ids[:, :1]))
        for t in range(1, seq_len):
            total += float(F.cross_entropy(logits.float(), ids[:, t], reduction="sum"))
            count += ids.shape[0]
            if t + 1 < seq_len:
                logits = run(ids[:, t:t + 1].contiguous())
    return math.exp(total / count)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, **decoder) -> torch.Tensor:
    dec = StaticDecoder(model, max_cache_len=prompts.shape[1] + new_tokens, **decoder)
    return dec.generate(prompts, max_new_tokens=new_tokens)[:, prompts.shape[1]:]


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
    p.add_argument("--no-onnx", action="store_true", help="leave out the ONNX engine's rows")
    args = p.parse_args(argv)
    model, _, _ = load_for_inference(args.checkpoint, torch.device("cpu"))
    tokens = torch.from_numpy(TokenDataset(args.data, args.split).tokens.astype("int64"))
    stride = (len(tokens) - args.prompt_len) // args.prompts
    prompts = torch.stack([tokens[i * stride:i * stride + args.prompt_len] for i in range(args.prompts)])
    # name -> (perplexity(), greedy tokens())
    rows = {"fp32 (torch)": (lambda: perplexity(model, tokens, args.windows, args.seq_len),
                             lambda: greedy(model, prompts, args.new_tokens, engine="torch", compile=False))}
    int8 = quantize_int8(model, "torch")
    rows["int8 (torch)"] = (lambda: perplexity(int8, tokens, args.windows, args.seq_len),
                            lambda: greedy(model, prompts, args.new_tokens, engine="torch", compile=False, quantize="int8"))
    if torchao_available():
        ao = quantize_int8(model, "torchao")
        rows["int8 (torchao)"] = (lambda: perplexity(ao, tokens, args.windows, args.seq_len), None)
    if not args.no_onnx:
        from wiola.decode.onnx_backend import OnnxEngine

        for q in (None, "int8", "int4"):
            engine = OnnxEngine(model, quantize=q)
            if not engine.cached():
                engine.export()
            rows[f"{q or 'fp32'} (onnx)"] = (
                lambda engine=engine: onnx_perplexity(engine, tokens, args.windows, args.seq_len),
                lambda q=q: greedy(model, prompts, args.new_tokens, engine="onnx", quantize=q))
    print(f"# {args.checkpoint}, {args.split} split of {args.data}: {args.windows} windows × {args.seq_len} tokens; "
          f"greedy: {args.prompts} prompts × {args.new_tokens} new tokens")
    print("| weights (engine) | perplexity | vs fp32 | greedy agreement | mean first difference at |\n|---|---:|---:|---:|---:|")
    reference = base = None
    for name, (ppl_of, greedy_of) in rows.items():
        ppl = ppl_of()
        out = greedy_of() if greedy_of is not None else None
        if reference is None:
            reference, base = out, ppl
            print(f"| {name} | {ppl:.3f} | — | — | — |", flush=True)
            continue
        if out is None:
            print(f"| {name} | {ppl:.3f} | {ppl / base - 1:+.2%} | — | — |", flush=True)
            continue
        same = out == reference
        first = [int((~row).nonzero()[0, 0]) if (~row).any() else args.new_tokens for row in same]
        print(f"| {name} | {ppl:.3f} | {ppl / base - 1:+.2%} | {same.float().mean():.1%} | {sum(first) / len(first):.0f} |", flush=True)


if __name__ == "__main__":
    main()
