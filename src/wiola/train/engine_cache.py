"""The end of `wiola train`: the final model's ONNX export placed in the CPU decoding engine's cache, so that the
first `wiola generate` (and `wiola chat`) of the trained model already runs on onnxruntime (`wiola.decode.choose`).

The rule: a `wiola train` command (new run, `--init-from`, `--lora` or `--resume`) that trained on CPU and ended
with its final model exports that model into the engine cache when onnx, onnxscript and onnxruntime are
installed; `--no-engine-cache` (or `WIOLA_TRAIN_ENGINE_CACHE=0`) skips it.

The export is of the model exactly as `wiola generate OUT` loads it (`load_for_inference(out)`: for a LoRA run, the
base with the adapter merged), so the cache key (`onnx_backend.model_key`: weights, config content, exporter) is the
one generate computes. Only rank 0 of a torchrun job exports, after the process group is gone. A run on CUDA or MPS
does not: such a model decodes on that device (the onnx engine is CPU-only), and the cache is per machine, so an
export for a CPU elsewhere is made there (`wiola export --to onnx`). The programmatic `wiola.train.trainer.train`
(and `wiola compare`, which trains through it) never exports. A failed export is one line on stderr, never a
failed training: the model is saved either way, and generate then decodes on torch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from wiola.errors import reason

ENV = "WIOLA_TRAIN_ENGINE_CACHE"  # "0" (or false/no/off): `wiola train` does not export (the test suite sets it)


def wanted(flag: bool | None) -> bool:
    """Whether to export: the `--engine-cache/--no-engine-cache` flag when given, else `$WIOLA_TRAIN_ENGINE_CACHE`
    (default on)."""
    if flag is not None:
        return flag
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_final_model(out: str | Path, device: str | None) -> str | None:
    """Export the model saved in `out` into the ONNX engine's cache; returns the one line to print (None: nothing
    done — not rank 0, not trained on CPU, or the ONNX packages missing). Never raises for a failed export."""
    import torch

    from wiola.decode import onnx_backend

    if int(os.environ.get("RANK", "0")) != 0 or device is None or torch.device(device).type != "cpu":
        return None
    if onnx_backend.missing(export=True):  # `wiola generate` says once per machine that onnxruntime would be faster
        return None
    start = time.perf_counter()
    try:
        from wiola.train.checkpoint import load_for_inference

        model = load_for_inference(out, torch.device("cpu"))[0]
        if getattr(model.config, "model_type", None) != "wiola" or next(model.parameters()).dtype != torch.float32:
            return None  # the static decoder (and so the onnx engine) runs float32 Wiola models only
        engine = onnx_backend.OnnxEngine(model)
        if engine.cached():
            return f"the final model's ONNX export is already in the CPU engine's cache ({engine.folder})"
        engine.export()
    except Exception as exc:  # noqa: BLE001 - any failure of the export: the trained model is saved regardless
        return (f"note: the ONNX export for the CPU engine failed ({type(exc).__name__}: {reason(exc)}); the model is saved, "
                "and wiola generate decodes it on torch")
    return (f"exported the final model to ONNX for the CPU engine in {time.perf_counter() - start:.1f} s ({engine.folder}): "
            "wiola generate on CPU decodes with onnxruntime from the first token (--no-engine-cache skips this)")


def after_training(out: str | Path, device: str | None, flag: bool | None) -> None:
    """`wiola train`'s last step: `cache_final_model` when `wanted`, its line on stderr."""
    if not wanted(flag):
        return
    line = cache_final_model(out, device)
    if line:
        print(f"wiola train: {line}", file=sys.stderr, flush=True)
