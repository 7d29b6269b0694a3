"""The one chooser of `wiola.decode`: which backend runs a `StaticDecoder`, by a rule stated in two lines.

On CPU, `engine="auto"` decodes with onnxruntime when this model's export is in the engine cache and onnxruntime
is installed, else with torch eager; `wiola train` on CPU, `wiola export --to onnx` and `engine="onnx"` fill the cache.

(In full: `wiola train` on CPU exports its final model at the end, `wiola.train.engine_cache`; `engine="onnx"`, and
`quantize` on auto, make the export if missing; `auto` never exports.)

Compiling is opt-in on CPU (`compile=True`); `compile="auto"` compiles on CUDA. `compile` True or False picks
the torch engine; int4 weights exist only on the onnx engine. Nothing here times a run or reads a ledger.
"""

from __future__ import annotations

import torch


def check_engine(engine: str, quantize: str | None, compile, device: torch.device, dtype: torch.dtype) -> str:
    """The engine asked for, validated: "auto", "torch" or "onnx" (int4 turns auto into onnx). Raises ValueError
    on a combination that cannot run."""
    if engine not in ("auto", "torch", "onnx"):
        raise ValueError(f"engine must be 'auto', 'torch' or 'onnx', got {engine!r}")
    if quantize == "int4":  # one engine has int4 weights: auto means it
        if engine == "torch":
            raise ValueError("int4 weights run on the onnx engine only (onnxruntime's MatMulNBits); use engine 'onnx' or 'auto'")
        engine = "onnx"
    if engine == "onnx":
        if device.type != "cpu":
            raise ValueError(f"the onnx engine runs on CPU only (the model is on {device.type}); use engine 'torch' or 'auto'")
        if compile is True:
            raise ValueError("compile applies to the torch engine; the onnx engine takes compile 'auto' or off")
        if dtype != torch.float32:
            raise ValueError(f"the onnx engine needs a float32 model, this one is {dtype}")
    return engine


def compiles(compile, device: torch.device, quantize: str | None) -> bool:
    """Whether the torch engine compiles its step: when asked (True), or on CUDA for `compile="auto"`."""
    return compile is True or (compile == "auto" and device.type == "cuda" and not quantize)


def considers_onnx(engine: str, compile, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the onnx engine is in play at all: asked for by name, or `auto` with compile left to auto on a
    float32 CPU model."""
    return engine == "onnx" or (engine == "auto" and compile == "auto" and device.type == "cpu" and dtype == torch.float32)


def may_export(engine: str, quantize: str | None) -> bool:
    """Whether a missing export is made: the onnx engine asked for by name, or quantized weights (which live in
    the export). `auto` alone never exports; such a run also says why it fell back to torch."""
    return engine == "onnx" or quantize is not None


def use_onnx(cached: bool, engine: str, quantize: str | None) -> str:
    """This run's step: "onnx" (the export cached), "export" (missing, and `may_export`: make it, then onnx) or
    "torch"."""
    if cached:
        return "onnx"
    return "export" if may_export(engine, quantize) else "torch"
