"""`wiola eval`: loss, perplexity and bits per byte of a checkpoint on a prepared split.

The split is read in consecutive windows of `seq_len + 1` tokens (`wiola.data.loader`);
each window's last `seq_len` tokens are predicted from the ones before them. Bits per byte divide the total negative log-likelihood (in bits) by the UTF-8 length
of the predicted tokens, decoded with the data's tokenizer, so models with different
tokenizers compare on the same text. `evaluate_batches` is shared with the training loop's
validation and splits the batches over ranks when run under torchrun.
"""

from __future__ import annotations

import contextlib
import json as _json
import math
import sys
from typing import Any, Iterable, Literal

import torch

from wiola.errors import WiolaError


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    dist: Any = None,
    tokenizer: Any = None,
    positions: Any = None,
) -> dict[str, float]:
    """Mean next-token loss over `(input_ids, labels)` batches (and the labels' UTF-8 bytes when a tokenizer is given).

    With a multi-process `dist`, rank r evaluates batches r, r+W, ...; every rank runs the
    same number of forward passes (a repeated batch with weight 0 pads the last round, as
    FSDP needs collective forwards) and the sums are all-reduced. `positions(ids)`, when given, returns
    extra forward arguments (the `position_ids` of --document-mask).
    """
    from wiola.train import distributed
    from wiola.train.batches import causal_lm_loss

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    was_training = model.training
    model.eval()
    all_batches = list(batches)
    if not all_batches:
        raise WiolaError("no evaluation batches (the split is empty or max_batches is 0)")
    rounds = math.ceil(len(all_batches) / world)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.zeros(2, dtype=torch.float64)  # predicted tokens, bytes
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        for r in range(rounds):
            index = r * world + rank
            weight = 1.0 if index < len(all_batches) else 0.0
            ids, labels = (t.to(device) for t in all_batches[min(index, len(all_batches) - 1)])
            output = model(input_ids=ids, use_cache=False, **(positions(ids) if positions is not None else {}))
            count = int((labels != -100).sum())  # chat data: only assistant tokens are scored
            nll += weight * causal_lm_loss(output.logits, labels).double() * count
            sums[0] += weight * count
            if tokenizer is not None and weight:
                sums[1] += sum(len(tokenizer.decode([t for t in row if t >= 0]).encode("utf-8")) for row in labels.tolist())
    model.train(was_training)
    if dist is not None and dist.enabled:
        packed = torch.cat([nll.reshape(1), sums.to(device)])
        distributed.all_reduce_sum(packed, dist)
        nll, sums = packed[0], packed[1:].cpu()
    total_nll, tokens, n_bytes = float(nll), int(sums[0]), int(sums[1])
    loss = total_nll / max(tokens, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if tokenizer is not None:
        result["bytes"] = n_bytes
        result["bits_per_byte"] = total_nll / math.log(2) / max(n_bytes, 1)
    return result


def eval_command(
    checkpoint: str,
    data: str,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    device: str = "auto",
    dtype: Literal["fp32", "bf16"] = "fp32",
    json: bool = False,
    allow_tokenizer_mismatch: bool = False,
    f3n_level: str | None = None,
) -> dict[str, float]:
    """Evaluate a model on a prepared split: loss, perplexity and bits per byte.

    Args:
        checkpoint: a model directory (a training `out/`, or one of its checkpoints/...).
        data: directory written by `wiola prepare`.
        split: which split to read.
        batch_size: sequences per forward pass.
        seq_len: tokens per sequence (default the model's max_position_embeddings).
        max_batches: evaluate at most this many batches (default the whole split).
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.
        dtype: fp32, or bf16 autocast.
        json: print one JSON object instead of a table.
        allow_tokenizer_mismatch: evaluate even when the model's tokenizer.json differs from the one the
            data was prepared with (the numbers are then meaningless; a warning is printed).
        f3n_level: F3N models: the granularity to evaluate — one level (`2`), one per layer (`1,2,4,4`), or
            `all` (every level in turn); each result also gives the inference FLOPs per token.
    """
    from wiola.data.manifest import file_sha256, verify
    from wiola.train import batches as batch_io
    from wiola.train.checkpoint import load_for_inference
    from wiola.train.distributed import resolve_device

    if dtype not in ("fp32", "bf16"):
        raise WiolaError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if batch_size <= 0 or (max_batches is not None and max_batches <= 0):
        raise WiolaError("--batch-size and --max-batches must be positive")
    if seq_len is not None and seq_len <= 0:
        raise WiolaError(f"--seq-len must be positive, got {seq_len}")
    dev = resolve_device(device)
    manifest = batch_io.read_manifest(data)
    verify(data, manifest)  # split sizes and the tokenizer's hash, cheaply
    model, _, model_dir = load_for_inference(checkpoint, dev)
    if model.config.vocab_size < manifest["vocab_size"]:
        raise WiolaError(f"the data's vocabulary ({manifest['vocab_size']}) is larger than the model's ({model.config.vocab_size})")
    context = model.config.max_position_embeddings
    seq_len = seq_len or context
    if seq_len > context:
        raise WiolaError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {context}")
    tok_dir = batch_io.tokenizer_dir(data)
    if tok_dir is None:
        raise WiolaError(f"{data} has no tokenizer/ directory, needed to count bytes")
    model_tok = model_dir / "tokenizer.json"
    if model_tok.is_file() and file_sha256(model_tok) != file_sha256(tok_dir / "tokenizer.json"):
        message = (f"{model_dir} was trained with another tokenizer than the one {data} was prepared with"
                   " (their tokenizer.json differ), so token ids mean different things")
        if not allow_tokenizer_mismatch:
            raise WiolaError(message + "; prepare the data with the model's tokenizer (or pass --allow-tokenizer-mismatch)")
        print(f"wiola eval: warning: {message}; the numbers below are not comparable", file=sys.stderr)
    settings = f3n_settings(model.config, f3n_level)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    batches = list(batch_io.eval_batches(data, split, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches))
    if settings is not None:
        return _eval_f3n_levels(model, settings, batches, dev, torch.bfloat16 if dtype == "bf16" else None, tokenizer,
                                {"checkpoint": str(model_dir), "split": split, "seq_len": seq_len}, json)
    result = evaluate_batches(model, batches, dev, torch.bfloat16 if dtype == "bf16" else None, tokenizer=tokenizer)
    result = {"checkpoint": str(model_dir), "split": split, "seq_len": seq_len, **result}
    if json:
        print(_json.dumps(result))
    else:
        print(f"{model_dir} on {split} ({result['tokens']:,} tokens, {result['bytes']:,} bytes, seq_len {seq_len})")
        print(f"  loss           {result['loss']:.4f}")
        print(f"  perplexity     {result['perplexity']:.3f}")
        print(f"  bits per byte  {result['bits_per_byte']:.4f}")
    return result


def f3n_settings(config: Any, spec: str | None) -> list[list[int]] | None:
    """The per-layer F3N levels `--f3n-level` asks for: `all` (each level 1..G), one level, or one per layer."""
    if spec is None:
        return None
    if getattr(config, "mlp", None) != "f3n":
        raise WiolaError(f"--f3n-level needs an F3N model (mlp=f3n); this one has mlp={getattr(config, 'mlp', None)}")
    n, g = config.num_hidden_layers, config.f3n_levels
    if spec.strip() == "all":
        return [[level] * n for level in range(1, g + 1)]
    try:
        levels = [int(v) for v in spec.split(",")]
    except ValueError:
        raise WiolaError(f"--f3n-level takes 'all', a level, or one level per layer (comma-separated), got {spec!r}") from None
    if len(levels) == 1:
        levels = levels * n
    if len(levels) != n or not all(1 <= v <= g for v in levels):
        raise WiolaError(f"--f3n-level {spec!r}: give 'all', one level in 1..{g}, or {n} comma-separated levels in 1..{g}")
    return [levels]


def _eval_f3n_levels(model, settings, batches, dev, amp_dtype, tokenizer, head: dict, as_json: bool) -> list[dict]:
    from wiola.configuration_wiola import flops_per_token

    layers = [m for m in model.modules() if hasattr(m, "set_level")]
    results = []
    for levels in settings:
        for mlp, level in zip(layers, levels):
            mlp.set_level(level)
        result = evaluate_batches(model, batches, dev, amp_dtype, tokenizer=tokenizer)
        flops = flops_per_token(model.config, context=head["seq_len"], f3n_level=levels)
        results.append({**head, "f3n_level": levels, "flops_per_token": flops, **result})
    if as_json:
        print(_json.dumps(results))
    else:
        print(f"{head['checkpoint']} on {head['split']} (seq_len {head['seq_len']}), F3N widths {model.config.f3n_widths()}")
        print(f"  {'level':<16} {'loss':>8} {'bits/byte':>10} {'MFLOPs/token':>13}")
        for r in results:
            level = str(r["f3n_level"][0]) if len(set(r["f3n_level"])) == 1 else ",".join(map(str, r["f3n_level"]))
            print(f"  {level:<16} {r['loss']:>8.4f} {r['bits_per_byte']:>10.4f} {r['flops_per_token'] / 1e6:>13.2f}")
    return results
