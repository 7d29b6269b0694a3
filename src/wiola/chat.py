"""`wiola chat`: an interactive terminal chat with a model, streaming its replies token by token.

Each turn renders the whole conversation with the tokenizer's chat template (the default of
`wiola.data.chat` when the tokenizer has none) and `add_generation_prompt=True`, and decodes the reply
until the eos token: Wiola models on the fast decoder (`wiola.decode.StaticDecoder`, one cache
of the model's context length, reused every turn) with `wiola generate`'s engine options and rule
(`--engine auto|torch|onnx`, `--quantize`, `--compile`, `--decoding`: on CPU the model's ONNX export under
onnxruntime when it is in the engine cache, else torch eager; `wiola.decode.choose`), other models (or
`--decoding generate`) through `generate()`. When the
conversation no longer fits the context, its oldest turns are left out of the prompt.
Commands at the prompt: `/reset` forgets the conversation, `/exit` (or Ctrl-D, or Ctrl-C) ends the chat.
Ctrl-C during a reply stops that reply and returns to the prompt (the unfinished exchange is left out
of the conversation). A line that is not valid UTF-8 is not sent, with a one-line note.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch

from wiola.errors import WiolaError

USER_PROMPT = "you> "
BOT_PROMPT = "bot> "


def fit_prompt(tokenizer, messages: list[dict[str, str]], context: int, reserve: int) -> tuple[torch.Tensor, int]:
    """Prompt ids [1, n] of the conversation, leaving out its oldest turns (never a system message) until
    n + reserve fits `context`; returns the ids and how many messages were left out."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    for dropped in range(len(rest)):
        kept = rest[dropped:]
        ids = tokenizer.apply_chat_template(system + kept, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
        if ids.shape[1] + reserve <= context:
            return ids, dropped
    raise WiolaError(f"the last message does not fit the model's context of {context} tokens with room for a reply")


def chat_command(
    checkpoint: str,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int = 1337,
    device: str = "auto",
    allow_changed_base: bool = False,
    decoding: Literal["auto", "static", "generate"] = "auto",
    compile: Literal["auto", "on", "off"] = "auto",
    quantize: Literal["none", "int8", "int4"] = "none",
    engine: Literal["auto", "torch", "onnx"] = "auto",
) -> int:
    """Chat with a model in the terminal; replies stream token by token.

    The conversation is rendered with the tokenizer's chat template (docs/finetune.md); type
    /reset to start over, /exit, Ctrl-D or Ctrl-C at the prompt to leave; Ctrl-C during a reply stops
    the reply. A LoRA run's directory works too (base + adapter, merged in memory). Replies decode as in
    wiola generate, with its options: on CPU, --engine auto runs the model's ONNX export under onnxruntime when
    it is in the engine cache (wiola train on CPU and wiola export --to onnx put it there), else torch eager.

    Args:
        checkpoint: a model directory (a training out/, one of its checkpoints/..., a merged LoRA model or any saved model).
        system: a system message that opens every conversation.
        max_new_tokens: most tokens per reply (fewer when the context is nearly full).
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample from the k most likely tokens only (0 or unset: no limit).
        top_p: nucleus sampling: smallest set of tokens with this total probability.
        greedy: always take the most likely token (no sampling).
        seed: random seed of the first reply (reply i uses seed + i).
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.
        allow_changed_base: LoRA runs: use the adapter even though its base model's weights changed since it was
            trained (normally refused: the outputs are then not the trained model's; a warning is printed).
        decoding: static = the preallocated cache and a plain loop (Wiola models only); generate = transformers'
            generate(); auto = static for Wiola models, else generate (as wiola generate).
        compile: compile the static decode step: auto = on CUDA, off on CPU; on / off (both: the torch engine).
        quantize: int8 / int4 weights on CPU, as wiola generate --quantize (int4: the onnx engine only).
        engine: what runs the static decode step on CPU, by wiola generate's rule: auto = onnx when this model's
            export is in the engine cache and onnxruntime is installed, else torch eager (auto never exports);
            onnx = the ONNX export under onnxruntime, exported into the cache first when missing; torch = PyTorch.
    """
    from transformers import TextStreamer

    from wiola.data.chat import ensure_chat_template
    from wiola.generate import (check_engine_options, check_sampling, sampling_arguments, static_decoder, text_problem,
                                uses_static_decoder)
    from wiola.train.checkpoint import load_for_inference

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    quantize, dev = check_engine_options(engine, quantize, compile, decoding, device)
    model, tokenizer, model_dir = load_for_inference(checkpoint, dev, allow_changed_base=allow_changed_base)
    static = uses_static_decoder(model, engine, quantize, decoding)
    if ensure_chat_template(tokenizer):
        print(f"note: the tokenizer of {model_dir} has no chat template; using the default one (docs/finetune.md)", file=sys.stderr)
    if tokenizer.eos_token_id is None:
        raise WiolaError(f"the tokenizer of {model_dir} has no eos token to end a reply")
    context = model.config.max_position_embeddings
    do_sample = not greedy and temperature > 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoder = static_decoder(model, context, compile, quantize, engine) if static else None
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass

    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(f"wiola chat with {model_dir}: /reset starts over, /exit or Ctrl-D quits", flush=True)
    turn = 0
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            print()
            return 0
        except UnicodeDecodeError as exc:  # the terminal's encoding is UTF-8 (strict) and the line is not
            print(f"(message not sent: the line is not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte {exc.start}))",
                  flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        problem = text_problem(text)
        if problem:
            print(f"(message not sent: the line is {problem})", flush=True)
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(base)
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": text})
        reserve = min(max_new_tokens, max(1, context // 4))
        try:
            ids, dropped = fit_prompt(tokenizer, messages, context, reserve)
        except WiolaError as exc:
            messages.pop()
            print(f"(message not sent: {exc})", flush=True)
            continue
        if dropped:
            print(f"(the {dropped} oldest message(s) no longer fit the context and are left out)", flush=True)
        ids = ids.to(dev)
        new = min(max_new_tokens, context - ids.shape[1])
        try:  # (from the reply's prompt on: a Ctrl-C as soon as "bot> " shows stops this reply too)
            print(BOT_PROMPT, end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            if decoder is not None:
                out = decoder.generate(ids, max_new_tokens=new, do_sample=do_sample, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, seed=seed + turn,
                                       streamer=streamer)
            else:
                from transformers import set_seed

                set_seed(seed + turn)
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                         **sampling_arguments(do_sample, temperature, top_k, top_p),
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, streamer=streamer)
        except KeyboardInterrupt:  # Ctrl-C stops this reply only (the decoder resets its cache on the next turn)
            messages.pop()
            print("\n(reply stopped and left out of the conversation; Ctrl-C at the prompt or Ctrl-D quits)", flush=True)
            turn += 1
            continue
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply.strip()})
        turn += 1
