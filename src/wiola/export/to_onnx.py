"""`wiola export --to onnx`: the model's step function (`onnx_step.OnnxStep`) as one ONNX graph, with its metadata.

Exported with `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript; the TorchScript exporter has no
ONNX op for `aten::rms_norm`), then rewritten with onnxruntime's fused operators where the exported pattern is
standard (`onnx_fuse`: RMSNorm, residual + RMSNorm; graph format 2). The step is traced twice, for a chunk of
any length and for a chunk of one token, and the two bodies are joined under one `If` on the chunk length
(`onnx_branch`, graph format 3; the weights are stored once). On Linux with two cores or more the one-token trace
runs in a forked child while this process traces the other (`_TokenTrace`; a quarter less export time at nano and
120M sizes; `WIOLA_ONNX_PARALLEL_TRACE=0`, or any failure of the child, traces both here, one after the other).
The graph has dynamic batch, chunk length and
capacity, so one file serves the prompt (a chunk of any length, left padding allowed) and every decode step (a
chunk of one, on the shorter body). The folder gets

* `model.onnx` (weights inside; in `model.onnx.data` beside it past 2 GB),
* `wiola_onnx.json`: the input, output and state names, the state's dtypes and symbolic shapes, the token ids
  and the Wiola config — all that `onnx_run` needs to allocate the state and decode, without torch,
* the tokenizer files.

Before anything is written, onnxruntime runs the graph on a prompt chunk and a decode step and its logits are
checked against PyTorch's.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from wiola.errors import WiolaError
from wiola.export.onnx_step import OnnxStep, empty_state, state_spec

METADATA = "wiola_onnx.json"
GRAPH = "model.onnx"
FORMAT = "wiola-onnx-step/3"  # 2: fused operators (onnx_fuse); 3: a one-token body (onnx_branch). Bump when the graph
# changes (the engine cache key holds it)
SINGLE_FORMAT = "wiola-onnx-step/2"  # the any-length trace alone (WIOLA_ONNX_ONE_TOKEN_BODY=0)
ONE_TOKEN_BODY_ENV = "WIOLA_ONNX_ONE_TOKEN_BODY"


def one_token_body() -> bool:
    """Whether exports hold the one-token body (default yes; `WIOLA_ONNX_ONE_TOKEN_BODY=0` exports the any-length
    trace alone, graph format 2: half the export time, slower decode steps; the test suite sets it)."""
    return os.environ.get(ONE_TOKEN_BODY_ENV, "1") != "0"


def graph_format() -> str:
    return FORMAT if one_token_body() else SINGLE_FORMAT
OPSET = 23  # the ONNX opset of the step graph: 23 has Attention (and RMSNormalization, which onnx_fuse replaces)
CHECK_TOLERANCE = 1e-3  # fp32 logits, onnxruntime vs PyTorch on the export's own check (they agree to ~1e-6)


def require_onnx() -> None:
    """One-line error when the optional `wiola[export]` packages are missing."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise WiolaError(f"wiola export --to onnx needs {', '.join(missing)}: pip install 'wiola[export]'")


EXTERNAL_AT = 1 << 31  # graphs past 2 GB keep their weights in GRAPH + ".data"
MAX_DIM = 1 << 30  # batch, sequence and cache sizes the graph accepts


def _dynamic_shapes(spec, one_token: bool = False):
    # explicit upper bounds: torch 2.6's export otherwise guards each size against int64's max and refuses
    dims = {"batch": torch.export.Dim("batch", min=1, max=MAX_DIM), "seq": torch.export.Dim("seq", min=1, max=MAX_DIM),
            "capacity": torch.export.Dim("capacity", min=1, max=MAX_DIM)}
    tokens = {0: dims["batch"]} if one_token else {0: dims["batch"], 1: dims["seq"]}
    return (tokens, dict(tokens), tuple({i: dims[s] for i, s in enumerate(t.shape) if isinstance(s, str)} for t in spec))


def metadata(model) -> dict:
    config = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "format": graph_format(),
        "graph": GRAPH,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["logits"],
        "past_prefix": "past.",
        "present_prefix": "present.",
        "state": [{"name": s.name, "dtype": dtype if s.dtype == "float" else s.dtype, "shape": list(s.shape)} for s in state_spec(config)],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True)",
        "config": config.to_diff_dict(),
    }


def export_program(model, one_token: bool = False):
    """The `torch.onnx.ONNXProgram` of `model`'s step (traced on a small example; every axis that varies is dynamic),
    or with `one_token` of its step on a chunk of one token (the chunk length static)."""
    import logging

    step = OnnxStep(model).eval()
    spec = state_spec(model.config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 1 if one_token else 3), generator=g)
    mask = torch.ones_like(ids)
    state = empty_state(model.config, 2, 5, dtype=next(model.parameters()).dtype)
    names = [s.name for s in spec]
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # notes on optional torchvision ops, axis names and deprecations
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                step, (ids, mask, *state), dynamo=True, dynamic_shapes=_dynamic_shapes(spec, one_token), verbose=False, opset_version=OPSET,
                input_names=["input_ids", "attention_mask"] + ["past." + n for n in names],
                output_names=["logits"] + ["present." + n for n in names],
            )
    finally:
        onnx_log.setLevel(level)


PARALLEL_TRACE_ENV = "WIOLA_ONNX_PARALLEL_TRACE"  # "0": trace the two bodies one after the other in this process


def _trace_token_body(model, path: str) -> None:
    """The forked child of `_TokenTrace`: trace the one-token step and save its program to `path`."""
    # What the parent left for its garbage collector must not be freed here: an onnxruntime session's destructor
    # waits for its thread pool's threads, which a fork does not copy, so it would wait forever (a process that had
    # run a session and dropped it, as `wiola serve` or a benchmark does). gc.freeze() keeps every inherited object
    # out of this process's collections; what the trace makes is still collected.
    gc.freeze()
    torch.set_num_threads(1)  # (as DataLoader workers do: the parent's thread pool does not survive a fork)
    export_program(model, one_token=True).save(path)


class _TokenTrace:
    """The one-token body traced in a forked child (Linux, two cores or more, CUDA not started: a fork copies the
    loaded model and modules for free, where a new interpreter would spend seconds importing) while the caller
    traces the any-length body. `result()` is the path of the child's saved program, or None (not started, failed
    or too slow: then the caller traces it itself, so a failure here costs time, never the export)."""

    def __init__(self, model, work: Path):
        import multiprocessing

        self.path, self.process = str(work / "one-token.onnx"), None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if (os.environ.get(PARALLEL_TRACE_ENV, "1") == "0" or sys.platform != "linux" or cores < 2
                or torch.cuda.is_initialized() or next(model.parameters()).device.type != "cpu"):
            return
        self.start = time.perf_counter()
        self.process = multiprocessing.get_context("fork").Process(target=_trace_token_body, args=(model, self.path), daemon=True)
        with warnings.catch_warnings():  # Python 3.12+: "this process is multi-threaded, use of fork() may lead to
            warnings.simplefilter("ignore", DeprecationWarning)  # deadlocks in the child": `result` bounds that wait
            self.process.start()

    def result(self) -> str | None:
        if self.process is None:
            return None
        # the child's trace is shorter than the caller's; past twice the caller's time (plus a minute) it is stuck
        self.process.join(timeout=60 + 2 * (time.perf_counter() - self.start))
        self.stop()
        ok = self.process.exitcode == 0 and os.path.isfile(self.path)
        return self.path if ok else None

    def stop(self) -> None:
        """End the child if it still runs."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()


def save_graph(chunk_program, token_program, path: Path, meta: dict | None = None) -> dict[str, int]:
    """Write the two exported programs (any chunk, one token) to `path` as one graph (`onnx_branch.join`), each with
    the fused operators of `onnx_fuse` (`token_program` None: the any-chunk graph alone, format 2; a str: the path
    its program was saved to); returns the any-chunk body's fusion counts. With the folder's metadata `meta`,
    records in it the state a step may update in place (`"in_place"`)."""
    import onnx

    from wiola.export.onnx_branch import in_place_names, join
    from wiola.export.onnx_fuse import fuse

    bodies = []
    for program in [p for p in (chunk_program, token_program) if p is not None]:
        if isinstance(program, str):  # saved by the forked child (`_TokenTrace`)
            body = onnx.load(program)
        else:
            program.save(str(path))  # (weights past 2 GB go to a .data file: onnx.load reads them back)
            body = onnx.load(str(path))
            Path(str(path) + ".data").unlink(missing_ok=True)
        bodies.append((body, fuse(body)))
    model = join(bodies[0][0], bodies[1][0]) if len(bodies) == 2 else bodies[0][0]
    counts = dict(bodies[0][1])
    if meta is not None:  # what a step may update in place (`onnx_branch.in_place_names`), recorded for the runtimes
        meta["in_place"] = {"prefill": in_place_names(model, meta, True), "decode": in_place_names(model, meta, False)}
    big = model.ByteSize() >= EXTERNAL_AT
    onnx.save_model(model, str(path), save_as_external_data=big, location=Path(path).name + ".data" if big else None)
    return counts


def check_against_torch(model, folder: Path, relative: bool = False) -> float:
    """Largest |logit difference| between onnxruntime (the saved graph) and PyTorch's step, over a left-padded
    prompt chunk and then two single-token steps (`relative`: divided by the largest |PyTorch logit|)."""
    from wiola.export.onnx_run import OnnxStepSession

    session = OnnxStepSession(folder)
    step = OnnxStep(model).eval()
    g = torch.Generator().manual_seed(1)
    length = max(1, min(7, model.config.max_position_embeddings - 2))
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : length // 2] = 0
    state = empty_state(model.config, 2, length + 2, dtype=next(model.parameters()).dtype)
    ort_state = [t.numpy() for t in state]
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for _ in range(3):
            out = step(ids, mask, *state)
            logits, ort_state = session(ids.numpy(), mask.numpy(), ort_state)
            worst = max(worst, float(abs(torch.from_numpy(logits).float() - out[0].float())[mask.bool()].max()))
            scale = max(scale, float(out[0].float()[mask.bool()].abs().max()))
            state = list(out[1:])
            ids = out[0][:, -1].argmax(-1, keepdim=True)
            mask = torch.ones_like(ids)
    return worst / scale if relative else worst


def export_onnx(model, model_dir: Path, folder: Path, quantize: str | None = None) -> list[str]:
    """Write the ONNX step graph of `model` (loaded from `model_dir`) with its metadata into `folder`; with
    `quantize` ("int8" or "int4") its large MatMuls then get block-wise weights (`wiola.export.onnx_quant`)."""
    require_onnx()
    meta = metadata(model)
    if one_token_body():
        with tempfile.TemporaryDirectory(prefix=".trace-", dir=folder) as work:
            child = _TokenTrace(model, Path(work))
            try:
                chunk = export_program(model)
                token = child.result() or export_program(model, one_token=True)
            finally:
                child.stop()  # (this trace failed or was interrupted: the child has nothing left to do)
            save_graph(chunk, token, folder / GRAPH, meta)
    else:
        save_graph(export_program(model), None, folder / GRAPH, meta)
    (folder / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    diff = check_against_torch(model, folder)
    if not diff <= CHECK_TOLERANCE:
        raise WiolaError(f"onnxruntime's logits differ from PyTorch's by {diff:.3g} on the export check; nothing written")
    tokenizer_note = copy_tokenizer_files(model_dir, folder)
    state = state_spec(model.config)
    notes = []
    if quantize:
        from wiola.export.onnx_quant import BLOCK_SIZE, SMALL_BLOCK, quantize_folder

        count = quantize_folder(folder, folder, quantize)
        error = check_against_torch(model, folder, relative=True)
        notes.append(f"{quantize} weights (MatMulNBits, blocks of {BLOCK_SIZE}, {SMALL_BLOCK} where K < {BLOCK_SIZE}) in {count} MatMuls; "
                     f"logits within {error:.1%} of PyTorch's float32 (largest difference over the largest logit) on the export check")
    return [f"{GRAPH}: one step graph (prompt chunk, or decode step on its one-token body), {len(state)} state tensors in and out; "
            f"onnxruntime agrees with PyTorch to {diff:.1e} on the export check", *notes,
            tokenizer_note]


def copy_tokenizer_files(model_dir: Path, folder: Path) -> str:
    """Copy the model folder's tokenizer files (real files, not links) into the export `folder`; returns the note."""
    from wiola.convert import TOKENIZER_FILES

    copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file() and not (model_dir / name).is_symlink()]
    for name in copied:
        shutil.copyfile(model_dir / name, folder / name)
    return f"tokenizer files: {', '.join(copied)}" if copied else "no tokenizer files found to copy"
