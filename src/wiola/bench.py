"""`wiola bench`: speed of a Wiola model measured side by side with `transformers.LlamaForCausalLM`
of the same shape (same d, L, H, H_kv, vocabulary; SwiGLU width matched to the Wiola parameter budget),
in one run, on one device.

Measures training tokens/s (random tokens, AdamW — fused on CUDA —, bf16 autocast on CUDA), peak memory,
MFU on CUDA, and greedy decoding tokens/s at the given batch sizes along two paths per model:
transformers' `generate()`, and a preallocated-cache loop (Wiola: `StaticDecoder`; LLaMA: `StaticCache`
and a hand-written loop), eager and — with `--compile` — with the decode step compiled (CUDA graphs on
CUDA). Prints a table with the Wiola/LLaMA ratio of each figure and writes the rows as JSON.

MFU = tokens/s × (6·N + 12·L·d·T) / peak, N = parameters taking part in matmuls (embedding lookup
excluded, LM head included), T = sequence length, peak = the device's dense bf16 peak (989.4 TFLOP/s
for H100/H200 SXM; override with --peak-tflops).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from wiola.configuration_wiola import WiolaConfig, llama_baseline
from wiola.errors import WiolaError

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def llama_twin(config: WiolaConfig):
    """`transformers.LlamaForCausalLM` config of the same shape and parameter budget."""
    from transformers import LlamaConfig

    base = llama_baseline(config)
    return LlamaConfig(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers, num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads, max_position_embeddings=base.max_position_embeddings,
        rms_norm_eps=base.rms_norm_eps, tie_word_embeddings=base.tie_word_embeddings, rope_theta=base.rope_theta,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: all, minus the embedding table unless it is tied to the LM head."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def train_speed(model, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device, compile: bool) -> dict[str, Any]:
    """Tokens/s and peak memory of full optimizer steps on random tokens."""
    model.train().to(device)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    use_bf16 = device.type == "cuda"
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median step
    row = {"tokens_per_s": batch * seq_len / seconds, "step_s": seconds}
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    model.zero_grad(set_to_none=True)
    return row


def _decode_inputs(model, batch: int, prompt_len: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)


def _timed(run, device: torch.device, repeats: int) -> tuple[float, Any]:
    run(warmup=True)  # compilation / graph capture happens here
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = run(warmup=False)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def llama_static_loop(model, new_tokens: int, max_cache_len: int, compile: bool, backend: str = "inductor"):
    """The LLaMA reference loop: `StaticCache`, prefill eager, then a greedy loop over a decode step that
    is `torch.compile`d (on CUDA mode "reduce-overhead": CUDA graphs) when `compile`. Returns
    `run(ids) -> generated ids`."""
    from transformers import StaticCache

    from wiola.compat_wiola import CACHE_KWARG
    from wiola.decode import CompiledStep

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)

    def one(tokens, positions):
        return model(input_ids=tokens, position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1]

    step = CompiledStep(one, compile, device, backend)

    def run(ids: torch.Tensor) -> torch.Tensor:
        cache.reset()
        b, n = ids.shape
        positions = torch.arange(n, device=device)[None].expand(b, n)
        logits = model(input_ids=ids, position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1]
        out = []
        for i in range(new_tokens):
            token = logits.argmax(dim=-1)
            out.append(token[:, None])
            if i < new_tokens - 1:
                logits = step(token[:, None], torch.full((b, 1), n + i, dtype=torch.long, device=device))
        return torch.cat(out, dim=1)

    return run


@torch.no_grad()
def decode_speed(model, batch: int, prompt_len: int, new_tokens: int, device: torch.device, repeats: int = 1,
                 method: str = "generate", compile: bool = False) -> dict[str, Any]:
    """Greedy decoding tokens/s (new tokens over all rows / wall time, prefill included; best of `repeats`).

    `method="generate"`: transformers' `generate()` with its default cache. `method="static"`: the
    preallocated-cache loop — `StaticDecoder` for Wiola, `llama_static_loop` for LLaMA — with the step
    compiled (CUDA graphs on CUDA) when `compile`. On CUDA the weights are cast to bf16."""
    model.eval().to(device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    ids = _decode_inputs(model, batch, prompt_len, device)
    if method == "generate":
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def run(warmup: bool):
            return model.generate(ids, **(dict(kw, max_new_tokens=4, min_new_tokens=4) if warmup else kw))[:, prompt_len:]
    elif model.config.model_type == "wiola":
        from wiola.decode import StaticDecoder

        decoder = StaticDecoder(model, max_cache_len=prompt_len + new_tokens, compile=compile)

        def run(warmup: bool):
            return decoder.generate(ids, max_new_tokens=new_tokens)[:, prompt_len:]
    else:
        loop = llama_static_loop(model, new_tokens, prompt_len + new_tokens, compile)

        def run(warmup: bool):
            return loop(ids)
    seconds, out = _timed(run, device, repeats)
    return {"tokens_per_s": batch * new_tokens / seconds, "seconds": seconds, "tokens": out.tolist() if batch == 1 else None}


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_bench(config: WiolaConfig, device: torch.device, *, train_batch: int, seq_len: int, train_steps: int, warmup: int,
              compile_modes: tuple[bool, ...], decode_batches: tuple[int, ...], prompt_len: int, new_tokens: int,
              peak_tflops: float | None = None, decode_repeats: int = 1,
              decode_methods: tuple[tuple[str, bool], ...] = (("generate", False), ("static", False)),
              rounds: int = 1) -> list[dict[str, Any]]:
    """Rows of measurements for the Wiola model and its LLaMA twin. Each measurement runs `rounds` times,
    alternating the two models, and keeps each model's fastest round, so slow drift of a shared machine
    falls on both. `decode_methods`: (method, compiled) pairs for `decode_speed`."""
    from transformers import LlamaForCausalLM

    from wiola.modeling_wiola import WiolaForCausalLM

    rows = []
    peak = _peak_tflops(device, peak_tflops)
    builders = {"wiola": lambda: WiolaForCausalLM(config), "llama": lambda: LlamaForCausalLM(llama_twin(config))}

    def best_of(measure) -> dict[str, dict[str, Any]]:
        best: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):
            for name, build in builders.items():
                torch.manual_seed(0)
                model = build()
                r = measure(model)
                r["params"] = sum(p.numel() for p in model.parameters())
                r["matmul_params"] = matmul_params(model)
                del model
                if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = r
        return best

    for compile in compile_modes:
        for name, r in best_of(lambda m: train_speed(m, train_batch, seq_len, train_steps, warmup, device, compile)).items():
            if peak:
                flops = 6 * r["matmul_params"] + 12 * config.num_hidden_layers * config.hidden_size * seq_len
                r["mfu"] = r["tokens_per_s"] * flops / (peak * 1e12)
            rows.append({"model": name, "what": "train", "compiled": compile, "batch": train_batch, "seq_len": seq_len, **r})
    for batch in decode_batches:
        for method, compiled in decode_methods:
            what = "decode generate()" if method == "generate" else "decode static loop"
            best = best_of(lambda m: decode_speed(m, batch, prompt_len, new_tokens, device, decode_repeats, method, compiled))
            for name, r in best.items():
                rows.append({"model": name, "what": what, "compiled": compiled, "batch": batch, "new_tokens": new_tokens, **r})
    return rows


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per (what, compiled, batch) with both models and wiola/llama ratios."""
    lines = ["| measurement | wiola | llama | ratio |", "|---|---:|---:|---:|"]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["what"], r["compiled"], r["batch"]), {})[r["model"]] = r
    for (what, compiled, batch), pair in keyed.items():
        if set(pair) != {"wiola", "llama"}:
            continue
        label = f"{what} {'compiled' if compiled else 'eager'} batch {batch}"
        for field, fmt in (("tokens_per_s", "{:,.0f}"), ("peak_gb", "{:.2f}"), ("mfu", "{:.1%}")):
            if field in pair["wiola"]:
                w, ll = pair["wiola"][field], pair["llama"][field]
                lines.append(f"| {label} {field} | {fmt.format(w)} | {fmt.format(ll)} | {w / ll:.2f} |")
    # Wiola's static loops against LLaMA's generate(), the path most LLaMA users run
    for batch in sorted({r["batch"] for r in rows if r["what"].startswith("decode")}):
        fast = [r for r in rows if r["model"] == "wiola" and r["what"] == "decode static loop" and r["batch"] == batch]
        base = [r for r in rows if r["model"] == "llama" and r["what"] == "decode generate()" and r["batch"] == batch]
        for w in fast if base else []:
            label = f"decode batch {batch}: wiola static loop ({'compiled' if w['compiled'] else 'eager'}) vs llama generate()"
            lines.append(f"| {label} tokens_per_s | {w['tokens_per_s']:,.0f} | {base[0]['tokens_per_s']:,.0f} | {w['tokens_per_s'] / base[0]['tokens_per_s']:.2f} |")
    same = identical_outputs(rows)
    if same is not None:
        lines.append(f"\nWiola batch-1 greedy tokens identical across decoding paths: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def identical_outputs(rows: list[dict[str, Any]]) -> bool | None:
    """Whether every batch-1 Wiola decoding path produced the same tokens (None: fewer than two paths)."""
    seqs = [r["tokens"] for r in rows if r["model"] == "wiola" and r["what"].startswith("decode") and r.get("tokens") is not None]
    return None if len(seqs) < 2 else all(seq == seqs[0] for seq in seqs)


def bench_command(
    config: str = "wiola-nano",
    set: list[str] | None = None,
    device: str = "auto",
    train_batch: int = 8,
    seq_len: int = 256,
    train_steps: int = 10,
    warmup: int = 3,
    compile: bool = False,
    decode: bool = True,
    decode_batch: list[int] | None = None,
    prompt_len: int = 32,
    new_tokens: int = 64,
    decode_repeats: int = 1,
    rounds: int = 1,
    peak_tflops: float | None = None,
    out: str | None = None,
) -> int:
    """Measure a Wiola model against the same-shape transformers LlamaForCausalLM, side by side.

    Args:
        config: preset name (see `wiola presets`).
        set: model config overrides, key=value with JSON values.
        device: auto (cuda > mps > cpu), cuda, mps or cpu.
        train_batch: sequences per training step.
        seq_len: tokens per training sequence.
        train_steps: timed training steps (the median is reported).
        warmup: untimed steps before timing (compilation happens here).
        compile: also measure both models under torch.compile: training, and the static decode loops
            with the step compiled (mode "reduce-overhead", i.e. CUDA graphs, on CUDA).
        decode: measure decoding (--no-decode: training only).
        decode_batch: batch sizes for greedy decoding (default 1).
        prompt_len: prompt tokens for decoding.
        new_tokens: tokens generated per row.
        decode_repeats: decoding runs per model and round (the fastest is reported).
        rounds: measure every figure this many times, alternating the two models, and keep each one's
            best round (use 3 or more on a shared or noisy machine).
        peak_tflops: device peak for MFU (default: known bf16 peak of the GPU).
        out: write the rows as JSON here.
    """
    from wiola.train.config import parse_overrides

    try:
        cfg = WiolaConfig.from_preset(config, **parse_overrides(set or []))
    except ValueError as exc:
        raise WiolaError(str(exc)) from exc
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    rows = run_bench(cfg, dev, train_batch=train_batch, seq_len=seq_len, train_steps=train_steps, warmup=warmup,
                     compile_modes=(False, True) if compile else (False,), decode_batches=tuple(decode_batch or [1]) if decode else (),
                     prompt_len=prompt_len, new_tokens=new_tokens, peak_tflops=peak_tflops, decode_repeats=decode_repeats,
                     decode_methods=(("generate", False), ("static", False)) + ((("static", True),) if compile else ()), rounds=rounds)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"# {config} vs LlamaForCausalLM of the same shape on {name}, torch {torch.__version__}")
    print(ratio_table(rows))
    if out:
        Path(out).write_text(json.dumps({"device": name, "config": config, "rows": rows}, indent=1))
    return 0
