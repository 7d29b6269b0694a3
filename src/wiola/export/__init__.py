"""`wiola export`: take a model out of this library, to the engines people deploy with.

* `--to llama` (`wiola.export.llama`): a model that is exactly LLaMA, saved as a plain `LlamaForCausalLM` folder
  (CTranslate2, llama.cpp's converter, vLLM); anything else is refused, naming the components in the way.
* `--to onnx` (`wiola.export.to_onnx`): any model, every component included, as one ONNX graph of a step
  function over explicit state (`wiola.export.onnx_step`), run with onnxruntime by `wiola.export.onnx_run`;
  `--quantize int8|int4` gives its large MatMuls block-wise weights (`wiola.export.onnx_quant`). The folder is also
  placed into the ONNX engine's cache (`wiola.decode.onnx_backend`), so the next `wiola generate` on CPU runs it
  (`--no-engine-cache`: not). When the cache already holds this model's export (the end of `wiola train` puts it
  there), that export is copied instead of traced again, and checked against PyTorch all the same.
* `--to gguf` (`wiola.export.gguf`): the models `--to llama` takes, as one GGUF file for llama.cpp
  (`--gguf-type f32|f16|q8_0|q4_0`, default f16), with a tokenizer description under which llama.cpp tokenizes as
  we do; `wiola.export.llama_cpp` finds a llama.cpp build to run it with.

All three write into a temporary folder next to OUT first (as `wiola convert` does), so a failure leaves OUT as it was.
See docs/export.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from wiola.errors import WiolaError

GGUF_FOR_QUANTIZE = {"int8": "q8_0", "int4": "q4_0"}  # --quantize's block-wise weights and the GGUF types of the same class


def export_model(model_dir: str | Path, out: str | Path, to: str, force: bool = False, quiet: bool = False,
                 quantize: str | None = None, engine_cache: bool = True, gguf_type: str | None = None) -> list[str]:
    """Export the model in `model_dir` to `out` in format `to` ("llama", "onnx" or "gguf"; `quantize` "int8" or
    "int4": block-wise weights in the ONNX graph, `wiola.export.onnx_quant`; `gguf_type` f32, f16 (the default),
    q8_0 or q4_0: the GGUF file's tensor type); returns the files written. With `engine_cache` an ONNX export is
    also copied into the ONNX engine's cache (`place_in_engine_cache`)."""
    import torch

    from wiola.convert import _check_destination, write_destination
    from wiola.data.lock import DirLock
    from wiola.train.checkpoint import find_model_dir, load_for_inference

    if to not in ("llama", "onnx", "gguf"):
        raise WiolaError(f"unknown export target {to!r}; choose llama, onnx or gguf")
    quantize = None if quantize in (None, "", "none") else quantize
    if quantize not in (None, "int8", "int4"):
        raise WiolaError(f"--quantize must be one of none, int8, int4; got {quantize!r}")
    if quantize and to == "gguf":
        raise WiolaError(f"--quantize applies to --to onnx; a GGUF file takes --gguf-type ({GGUF_FOR_QUANTIZE[quantize]} is the GGUF counterpart of {quantize})")
    if quantize and to != "onnx":
        raise WiolaError(f"--quantize {quantize} applies to --to onnx (a --to llama folder keeps the model's float weights)")
    if gguf_type is not None and to != "gguf":
        raise WiolaError(f"--gguf-type applies to --to gguf, not --to {to}")
    if to == "onnx":
        from wiola.export.to_onnx import require_onnx

        require_onnx()
    if to == "gguf":
        from wiola.export.gguf import GGUF_TYPES, require_gguf

        gguf_type = gguf_type or "f16"
        if gguf_type not in GGUF_TYPES:
            raise WiolaError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
        require_gguf()
    src, dst = find_model_dir(model_dir), Path(out).expanduser()
    _check_destination(src, dst, force)
    model, _, src = load_for_inference(src, torch.device("cpu"))
    if getattr(model.config, "model_type", None) != "wiola":
        raise WiolaError(f"{src} holds a {model.config.model_type!r} model, not a Wiola one")
    cached = None  # --to onnx: the engine cache's folder of this very export, when it has one
    if to in ("llama", "gguf"):
        from wiola.export.llama import export_llama, llama_blockers

        blockers = llama_blockers(model.config, model.state_dict())
        if blockers:  # before any work: the one line that says why
            raise WiolaError(f"not a LLaMA model: {'; '.join(blockers)} (only a model that is exactly LLaMA exports --to {to}; --to onnx takes any model)")
        if to == "llama":
            write_to = export_llama
        else:
            from wiola.export.gguf import export_gguf_folder

            def write_to(model, src, folder):
                return export_gguf_folder(model, src, folder, gguf_type)
    else:
        from wiola.export.to_onnx import export_onnx

        from wiola.decode.onnx_backend import OnnxEngine

        engine = OnnxEngine(model, quantize)  # (its key hashes the weights once, for the lookup and the placing)
        cached = cached_onnx_export(engine)

        def write_to(model, src, folder):
            if cached is not None:  # this model's export is in the engine's cache (`wiola train` put it there, say)
                return copy_onnx_export(model, src, cached, folder)
            return export_onnx(model, src, folder, quantize=quantize)
    notes: list[str] = []

    def write(folder: Path) -> None:
        notes.extend(write_to(model, src, folder))

    dst.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(dst.parent / f".{dst.name}.wiola.lock", "wiola export"):
        _check_destination(src, dst, force)
        written = write_destination(dst, write)
    if to == "onnx" and engine_cache and cached is None:
        notes.append(place_in_engine_cache(engine, dst))
    if not quiet:
        print(f"Exported {src} to {dst} ({to}): " + "; ".join(notes) + ".")
    return written


def cached_onnx_export(engine) -> Path | None:
    """The ONNX engine's cache folder holding the export of `engine` (a `wiola.decode.onnx_backend.OnnxEngine`: a model
    and its weight type), verified against the model's key (weights, config, exporter) and the files' recorded
    hashes, and of the graph format this exporter writes now; None when there is none."""
    import json

    try:
        from wiola.export.to_onnx import METADATA, graph_format

        if not engine.cached():
            return None
        # (WIOLA_ONNX_ONE_TOKEN_BODY=0 writes the any-length body alone: another format)
        return engine.folder if json.loads((engine.folder / METADATA).read_text()).get("format") == graph_format() else None
    except Exception:  # noqa: BLE001 - an unreadable cache: export from the model instead
        return None


def copy_onnx_export(model, model_dir: Path, cached: Path, folder: Path) -> list[str]:
    """`wiola export --to onnx` from the engine's cache: its graph and metadata copied into `folder`, the
    tokenizer files from `model_dir`, and onnxruntime checked against PyTorch on the copy (as after an export)."""
    import shutil

    from wiola.decode.onnx_backend import RECORD
    from wiola.export.onnx_quant import quantized_kind
    from wiola.export.to_onnx import CHECK_TOLERANCE, check_against_torch, copy_tokenizer_files

    for item in sorted(cached.iterdir()):
        if item.is_file() and not item.is_symlink() and item.name != RECORD:
            shutil.copyfile(item, folder / item.name)
    quantized = quantized_kind(folder) is not None
    diff = check_against_torch(model, folder, relative=quantized)
    if not quantized and not diff <= CHECK_TOLERANCE:
        raise WiolaError(f"the cached export's logits differ from PyTorch's by {diff:.3g}; remove {cached} and export again")
    agree = f"logits within {diff:.1%} of PyTorch's float32" if quantized else f"onnxruntime agrees with PyTorch to {diff:.1e}"
    return [f"copied from the ONNX engine's cache ({cached}: this model's export, verified by its key); {agree} on the export check",
            copy_tokenizer_files(model_dir, folder)]


def place_in_engine_cache(engine, folder: Path) -> str:
    """Copy the ONNX export in `folder` of `engine`'s model into the ONNX engine's cache (`OnnxEngine.adopt`),
    where `wiola generate --engine auto` finds it; returns the note to print. Best effort: a cache that cannot be
    written is said, not raised (the export itself is done)."""
    try:
        cached = engine.adopt(folder)
    except OSError as exc:
        return f"not placed in the ONNX engine's cache ({type(exc).__name__}: {exc})"
    return f"placed in the ONNX engine's cache ({cached}), which wiola generate on CPU uses"


def export_command(checkpoint: str, out: str, to: Literal["llama", "onnx", "gguf"] | None = None, force: bool = False,
                   quantize: Literal["none", "int8", "int4"] = "none", engine_cache: bool = True,
                   gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] | None = None) -> None:
    """Export a Wiola model for other inference engines: a plain LLaMA folder, an ONNX graph with its state, or a
    GGUF file for llama.cpp.

    --to llama saves a model that is exactly LLaMA (every component off, or equal to LLaMA by value) as a
    transformers LlamaForCausalLM folder that loads without trust_remote_code (CTranslate2's
    ct2-transformers-converter, llama.cpp's converter, vLLM); other models are refused, naming the components
    that prevent it. --to onnx saves any model as one ONNX graph of a step function (prompt chunk or decode
    step) whose attention mask and whole state (keys/values, GSA and GCLA running sums, ATM groups) are inputs
    and outputs, checked against PyTorch with onnxruntime; run it with wiola.export.onnx_run. --to onnx --quantize
    int8|int4 stores the large MatMuls' weights block-wise in 8 or 4 bits (onnxruntime's MatMulNBits, blocks of 128,
    32 where K < 128, int8 activations: the class of llama.cpp's Q8_0/Q4_0). An ONNX export is also placed into the ONNX engine's
    cache, so that the next wiola generate of this model on CPU decodes with onnxruntime (with --quantize: the next
    one with the same --quantize). --to gguf writes a model that --to llama takes as OUT/model.gguf for llama.cpp
    (--gguf-type f32, f16, q8_0 or q4_0), with its tokenizer described so that llama.cpp tokenizes as wiola does.
    See docs/export.md.

    Args:
        checkpoint: a model directory (a training out/, one of its checkpoints/..., or any saved Wiola model).
        out: output folder (must be empty or absent unless --force).
        to: llama, onnx or gguf (required).
        force: write into a non-empty OUT: the new files replace files of the same names, files an earlier
            export wrote are removed, every other file stays.
        quantize: none, int8 or int4 (--to onnx only): block-wise 8- or 4-bit weights for the attention
            projections, MLPs and LM head (onnxruntime's MatMulNBits); the logits' distance from float32 is
            reported.
        engine_cache: --to onnx: also copy the export into the ONNX engine's cache (~/.cache/wiola/onnx, or
            $WIOLA_ONNX_CACHE), where wiola generate --engine auto (the default) finds it; --no-engine-cache: not.
        gguf_type: --to gguf: the tensors' type: f32, f16 (default; norms stay f32), q8_0 or q4_0 (blocks of 32,
            the GGUF counterparts of --quantize int8 / int4; a matrix whose rows are not a multiple of 32 long
            stays f16).
    """
    if to is None:
        raise WiolaError("say what to export to: --to llama, --to onnx or --to gguf")
    export_model(checkpoint, out, to, force=force, quantize=quantize, engine_cache=engine_cache, gguf_type=gguf_type)


def __getattr__(name: str):
    if name in ("onnx_generate", "OnnxStepSession", "onnx_generate_text"):
        from wiola.export import onnx_run

        return getattr(onnx_run, name)
    if name == "export_gguf":
        from wiola.export.gguf import export_gguf

        return export_gguf
    raise AttributeError(name)


__all__ = ["export_model", "export_command", "export_gguf", "onnx_generate", "OnnxStepSession", "onnx_generate_text"]
