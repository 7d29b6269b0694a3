"""Run a `wiola export --to onnx` folder with onnxruntime: `OnnxStepSession` (one step) and `onnx_generate`
(greedy decoding). Needs only numpy and onnxruntime (and `tokenizers` for `onnx_generate_text`); this file
imports nothing else from wiola or torch, so it can be copied next to an exported model and used on its own.

    from wiola.export.onnx_run import onnx_generate
    new_tokens = onnx_generate("model-onnx", [[5, 17, 42]], max_new_tokens=32)      # np.ndarray [1, 32]

The graph takes `input_ids [B, T]`, `attention_mask [B, T]` (1 = real, 0 = left padding) and the state, and
returns `logits [B, T, V]` and the new state. The state is allocated once for a capacity of slots (prompt plus
new tokens) and handed back each step; its layout is in `wiola_onnx.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METADATA = "wiola_onnx.json"
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "bool": np.bool_, "int64": np.int64}


class OnnxStepSession:
    """An onnxruntime session over an exported folder. `session(input_ids, attention_mask, state)` returns
    `(logits, new_state)`; `empty_state(batch, capacity)` is the state before the first token.

    Args:
        folder: the folder `wiola export --to onnx` wrote.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(self, folder: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.folder = folder = Path(folder)
        try:
            self.meta = json.loads((folder / METADATA).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder} is not a wiola ONNX export (cannot read {METADATA}: {exc})") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(folder / self.meta["graph"]), options, providers=providers or ["CPUExecutionProvider"])
        self.state_names = [s["name"] for s in self.meta["state"]]
        self.inputs = [self.meta["past_prefix"] + n for n in self.state_names]
        self.outputs = ["logits"] + [self.meta["present_prefix"] + n for n in self.state_names]

    def empty_state(self, batch: int, capacity: int) -> list[np.ndarray]:
        state = []
        for s in self.meta["state"]:
            dtype = _DTYPES.get(s["dtype"])
            if dtype is None:
                raise ValueError(f"state dtype {s['dtype']} has no numpy equivalent; export the model in float32")
            shape = [{"batch": batch, "capacity": capacity}.get(d, d) for d in s["shape"]]
            state.append(np.zeros(shape, dtype=dtype))
        return state

    def __call__(self, input_ids, attention_mask, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        feeds.update(zip(self.inputs, state))
        logits, *new_state = self.session.run(self.outputs, feeds)
        return logits, new_state


def onnx_generate(folder_or_session, input_ids, attention_mask=None, max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, return_logits: bool = False):
    """Greedy decoding: the prompt in one step, then one step per token.

    Args:
        folder_or_session: an exported folder or an `OnnxStepSession`.
        input_ids: `[B, T]` token ids (rows left-padded to one length).
        attention_mask: `[B, T]`, 1 for real tokens and 0 for padding (default: all real).
        max_new_tokens: tokens to generate per row.
        eos_token_id: stop a row at this token (or any of these; later positions get `pad_token_id`); stop when
            every row has.
        pad_token_id: filler after a row's end (default the (first) `eos_token_id`).
        return_logits: also return the logits of every generated position, `[B, N, V]`.

    Returns the new tokens `[B, N]` (N = max_new_tokens unless every row ended earlier), and the logits if asked.
    """
    session = folder_or_session if isinstance(folder_or_session, OnnxStepSession) else OnnxStepSession(folder_or_session)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, prompt_len] with prompt_len >= 1, got {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, expected {ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    vocab, context = session.meta["vocab_size"], session.meta["max_position_embeddings"]
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab})")
    capacity = ids.shape[1] + max_new_tokens - 1  # the last new token is never fed back
    if capacity > context:
        raise ValueError(f"{ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the model's context of {context}")
    eos = None if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id, dtype=np.int64))
    pad = (eos[0] if eos is not None else 0) if pad_token_id is None else pad_token_id
    state = session.empty_state(ids.shape[0], capacity)
    done = np.zeros(ids.shape[0], dtype=bool)
    tokens, all_logits = [], []
    logits, state = session(ids, mask, state)
    for i in range(max_new_tokens):
        last = logits[:, -1]
        nxt = last.argmax(-1).astype(np.int64)
        if eos is not None:
            nxt = np.where(done, pad, nxt)
            done |= np.isin(nxt, eos)
        tokens.append(nxt)
        if return_logits:
            all_logits.append(last)
        if i == max_new_tokens - 1 or done.all():
            break
        logits, state = session(nxt[:, None], np.ones((ids.shape[0], 1), dtype=np.int64), state)
    out = np.stack(tokens, axis=1)
    return (out, np.stack(all_logits, axis=1)) if return_logits else out


def onnx_generate_text(folder: str | Path, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt` with the exported folder's tokenizer (`tokenizer.json`)."""
    from tokenizers import Tokenizer

    session = OnnxStepSession(folder)
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [session.meta["bos_token_id"]]
    room = session.meta["max_position_embeddings"] - len(ids) + 1
    new = onnx_generate(session, [ids], max_new_tokens=min(max_new_tokens, room), eos_token_id=session.meta["eos_token_id"])
    return prompt + tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
