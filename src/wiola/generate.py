"""`wiola generate`: sample text from any checkpoint directory.

The model and tokenizer load through the Auto classes (`import wiola` registers the wiola
model type, so LLaMA-style and Wiola checkpoints both work). Wiola models decode on the fast path
(`wiola.decode.StaticDecoder`: preallocated cache; the step compiled with CUDA graphs on CUDA, on CPU only
with `--compile on`; `--quantize int8|int4` for quantized CPU decoding; on CPU `--engine auto` runs the model's
ONNX export under onnxruntime when it is in the engine cache — made at the end of `wiola train` on CPU, by
`wiola export --to onnx` or by an earlier `--engine onnx` / `--quantize` run —, else torch eager, `wiola.decode.onnx_backend`); other
models, or `--decoding generate`, go through transformers' `generate()`. On CPU the thread count is set to
the physical cores unless OMP_NUM_THREADS says otherwise (`wiola.decode.caches`). A single sample streams to the
terminal token by token through transformers' `TextStreamer`; several samples are drawn
in batches of at most `SAMPLE_BATCH_BYTES` of estimated decoding memory (`samples_per_batch`: one batch for
a few hundred samples of a small model) and printed one after another as each batch ends, so any
`--num-samples` runs in bounded memory. Sampling is seeded for repeatability: batch i draws with
`batch_seed(seed, i)`, batch 0 with the seed itself.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

import torch

from wiola.errors import WiolaError

SAMPLE_BATCH_BYTES = 1 << 30  # estimated decoding memory of one batch of samples (`samples_per_batch`)


def text_problem(text: str) -> str | None:
    """Why `text` is not valid UTF-8 text, or None. Bytes that were not UTF-8 in a command-line argument
    (or a terminal's line) reach Python as lone surrogates U+DC80..U+DCFF; the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        return f"not valid UTF-8 text ({what} at character {exc.start})"


def encode_prompt(tokenizer, prompt: str, context: int, device: torch.device) -> torch.Tensor:
    """Prompt ids [1, n]; an empty prompt starts from the BOS (or EOS) token."""
    problem = text_problem(prompt)
    if problem:
        raise WiolaError(f"the prompt is {problem}")
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.empty(1, 0, dtype=torch.long)
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise WiolaError("empty prompt and the tokenizer has no BOS or EOS token to start from")
        ids = torch.tensor([[start]])
    if ids.shape[1] > context:
        raise WiolaError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context of {context} (max_position_embeddings)")
    return ids.to(device)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line errors for decoding options that `wiola generate` and `wiola chat` share."""
    if max_new_tokens <= 0:
        raise WiolaError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0) or (top_p is not None and not 0 < top_p <= 1):
        raise WiolaError(f"--temperature must be a finite number >= 0 and --top-p in (0, 1] (got {temperature}, {top_p})")
    if top_k is not None and top_k < 0:
        raise WiolaError(f"--top-k must be >= 0 (0: no limit), got {top_k}")


def check_engine_options(engine: str, quantize: str | None, compile: str, decoding: str, device: str):
    """One-line errors for the decoding-engine options that `wiola generate` and `wiola chat` share, before the model
    loads; returns (the quantization, None for none; the device). On CPU this also sets torch's threads
    (`wiola.cpu.cpu_threads`)."""
    from wiola.quantize import check_quantize
    from wiola.train.distributed import resolve_device

    quantize = check_quantize(quantize)
    if engine not in ("auto", "torch", "onnx"):
        raise WiolaError(f"--engine must be one of auto, torch, onnx; got {engine!r}")
    if quantize == "int4" and engine == "torch":
        raise WiolaError("--quantize int4 runs on the onnx engine only; it does not combine with --engine torch")
    if (engine == "onnx" or quantize == "int4") and (compile == "on" or decoding == "generate"):
        clash = "--compile on" if compile == "on" else "--decoding generate"
        raise WiolaError(f"--{'engine onnx' if engine == 'onnx' else 'quantize int4'} does not combine with {clash} (that runs on the torch engine)")
    dev = resolve_device(device)
    if dev.type == "cpu":
        from wiola.cpu import cpu_threads

        cpu_threads()
    if quantize and dev.type != "cpu":
        raise WiolaError(f"--quantize {quantize} runs on CPU only; add --device cpu")
    if engine == "onnx" and dev.type != "cpu":
        raise WiolaError(f"--engine onnx runs on CPU only (the device is {dev}); add --device cpu")
    return quantize, dev


def uses_static_decoder(model, engine: str, quantize: str | None, decoding: str) -> bool:
    """Whether `model` decodes on `wiola.decode.StaticDecoder` (a Wiola model, `--decoding` auto or static), with
    one-line errors for options that need it."""
    is_wiola = getattr(model.config, "model_type", None) == "wiola"
    if quantize and not (is_wiola and decoding in ("auto", "static")):
        raise WiolaError("--quantize needs the static decoding path of a Wiola model (not --decoding generate)")
    if engine == "onnx" and not is_wiola:
        raise WiolaError(f"--engine onnx needs a Wiola model; this checkpoint is {model.config.model_type!r}")
    if decoding == "static" and not is_wiola:
        raise WiolaError(f"--decoding static needs a Wiola model; this checkpoint is {model.config.model_type!r} (use --decoding generate)")
    return is_wiola and decoding in ("auto", "static")


def static_decoder(model, cache_len: int, compile: str, quantize: str | None, engine: str):
    """The `StaticDecoder` of `wiola generate` and `wiola chat`: the engine by `wiola.decode.choose`'s rule, its notes
    on stderr."""
    from wiola.decode import StaticDecoder

    return StaticDecoder(model, max_cache_len=cache_len, compile={"on": True, "off": False}.get(compile, "auto"),
                         quantize=quantize, verbose=True, engine=engine)


def sampling_arguments(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> dict:
    """transformers' `generate()` sampling arguments: none of them when decoding greedily."""
    return dict(do_sample=do_sample, temperature=temperature if do_sample else None,
                top_k=(top_k or None) if do_sample else None, top_p=top_p if do_sample else None)


def generate_command(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    greedy: bool = False,
    num_samples: int = 1,
    seed: int = 1337,
    device: str = "auto",
    stream: bool = True,
    decoding: Literal["auto", "static", "generate"] = "auto",
    compile: Literal["auto", "on", "off"] = "auto",
    quantize: Literal["none", "int8", "int4"] = "none",
    engine: Literal["auto", "torch", "onnx"] = "auto",
    allow_changed_base: bool = False,
) -> list[str]:
    """Generate text from a trained model, streaming it to the terminal.

    Args:
        checkpoint: a model directory (a training `out/`, one of its checkpoints/..., or any saved model).
        prompt: text to continue ("" starts from the BOS token).
        max_new_tokens: tokens to generate per sample; capped so prompt + output fit the context.
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample from the k most likely tokens only (0 or unset: no limit).
        top_p: nucleus sampling: smallest set of tokens with this total probability.
        greedy: always take the most likely token (no sampling).
        num_samples: independent samples to draw (in batches of bounded memory, each printed when it ends).
        seed: random seed for sampling.
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.
        stream: print tokens as they are generated (single sample).
        decoding: static = preallocated cache and a plain loop (the fast path, Wiola models only);
            generate = transformers' generate(); auto = static for Wiola models, else generate.
        compile: compile the static decode step (CUDA graphs on CUDA; inductor with freezing and the C++
            wrapper on CPU, which costs up to a minute the first time); auto = on CUDA, off on CPU; on / off
            (both: the torch engine).
        quantize: int8 / int4 = decode with 8- / 4-bit weights and int8 activations (CPU only; slightly
            different tokens from fp32, see docs/benchmarks.md). On the onnx engine (auto's choice when
            onnxruntime is installed): block-wise weights, the class of llama.cpp's Q8_0 / Q4_0, made into the
            engine cache on first use (or by wiola export --to onnx --quantize); int8 on the torch engine (--engine torch, --compile on/off, or without
            onnxruntime): PyTorch's int8. int4 runs on the onnx engine only. none = the model's own weights.
        engine: what runs the static decode step on CPU. auto = onnx when this model's export is in the
            engine cache (~/.cache/wiola/onnx; made at the end of wiola train on CPU, by wiola export --to onnx,
            or by an earlier --engine onnx or --quantize run) and onnxruntime is installed, else torch eager; auto never exports by itself.
            onnx = the model's ONNX export under onnxruntime (the tokens of the torch path), exported into the
            cache first when missing (about 10-20 s at nano size, once per set of weights); torch = PyTorch
            (eager or compiled, see --compile). Without onnxruntime or when the export fails: torch, with a
            note. --compile on/off mean torch (except with --quantize int4).
        allow_changed_base: LoRA runs: use the adapter even though its base model's weights changed since it was
            trained (normally refused: the outputs are then not the trained model's; a warning is printed).
    """
    from transformers import GenerationConfig, TextStreamer, set_seed

    from wiola.train.checkpoint import load_for_inference

    if num_samples <= 0:
        raise WiolaError(f"--num-samples must be positive, got {num_samples}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    quantize, dev = check_engine_options(engine, quantize, compile, decoding, device)
    model, tokenizer, _ = load_for_inference(checkpoint, dev, allow_changed_base=allow_changed_base)
    static = uses_static_decoder(model, engine, quantize, decoding)
    context = model.config.max_position_embeddings
    ids = encode_prompt(tokenizer, prompt, context, dev)
    room = context - ids.shape[1]
    if room <= 0:
        raise WiolaError(f"the prompt fills the model's whole context of {context} tokens; nothing can be generated")
    if max_new_tokens > room:
        print(f"wiola generate: note: max_new_tokens capped at {room} to stay within the context of {context}", file=sys.stderr)
        max_new_tokens = room

    do_sample = not greedy and temperature > 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream and num_samples == 1 else None
    cache_len = cache_slots(ids.shape[1] + max_new_tokens, context) if static else ids.shape[1] + max_new_tokens
    batch = samples_per_batch(model.config, cache_len, num_samples)  # bounded memory for any --num-samples
    texts: list[str] = []
    if static:
        decoder = static_decoder(model, cache_len, compile, quantize, engine)
        for index, first in enumerate(range(0, num_samples, batch)):
            out = decoder.generate(
                ids.expand(min(batch, num_samples - first), -1), max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature, top_k=top_k or None, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id, seed=batch_seed(seed, index), streamer=streamer,
            )
            texts += _finish(tokenizer, out, num_samples, streamer, first)
        return texts
    for index, first in enumerate(range(0, num_samples, batch)):
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            **sampling_arguments(do_sample, temperature, top_k, top_p),
            num_return_sequences=min(batch, num_samples - first),
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        set_seed(batch_seed(seed, index))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen, streamer=streamer)
        texts += _finish(tokenizer, out, num_samples, streamer, first)
    return texts


def sample_bytes(config, cache_len: int, dtype_bytes: int = 4) -> int:
    """Estimated memory one sample takes while decoding: its key/value cache of `cache_len` slots and half as
    much again (running means, the prompt's ordinary cache, buffers) plus eight rows of logits (sampling's
    softmax, sort and masks). The wiola-nano shape (256 slots, vocabulary 8,192): 5.0 MB estimated, 3.2 MB
    measured (peak RSS of 1,500 samples in one batch, less that of 300, per sample)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * cache_len * dtype_bytes
    return kv * 3 // 2 + 8 * config.vocab_size * 4


def samples_per_batch(config, cache_len: int, num_samples: int, budget: int | None = None) -> int:
    """How many of `num_samples` samples to decode at once so one batch stays within `budget` bytes (at least 1)."""
    budget = SAMPLE_BATCH_BYTES if budget is None else budget
    return max(1, min(num_samples, budget // max(1, sample_bytes(config, cache_len))))


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch `index`: the seed itself for the first, then spread out (seed + index would
    repeat seed + 1's first batch), within 0 .. 2**32 - 1 as numpy and transformers want."""
    return (seed + index * 0x9E3779B1) % 2**32


def cache_slots(needed: int, context: int, bucket: int = 256) -> int:
    """Cache size for a run needing `needed` slots: rounded up to a multiple of `bucket` (at most the
    context), so runs of different lengths share one compiled step and its cache entries."""
    return min(context, -(-needed // bucket) * bucket)


def _finish(tokenizer, out: torch.Tensor, num_samples: int, streamer, first: int = 0) -> list[str]:
    """Decode (and unless streamed, print) samples `first`, `first` + 1, ... of `num_samples`."""
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out]
    if streamer is None:
        for i, text in enumerate(texts, first):
            if num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(text, flush=True)
    return texts
