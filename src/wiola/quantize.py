"""Int8 quantization for CPU decoding on the torch engine: `quantize_int8(model, backend)` returns an int8 copy of a
model. (`check_quantize` names every `--quantize` choice: the ONNX engine's block-wise int8 and int4 weights are
`wiola.export.onnx_quant`.)

The scheme is the one CTranslate2 calls int8: every large `nn.Linear` (both dimensions ≥ `MIN_DIM`; the
LM head included, the embedding table not) keeps int8 weights with one scale per output channel, and its
input is quantized to 8 bits per call, so the product runs on the CPU's integer GEMM (VNNI/AVX-512 on
x86). Small layers — the GSA gate's head-sized linears — stay fp32. Two backends:

- `"torch"`: PyTorch's own kernels (`torch.ao.quantization.quantize_dynamic`, fbgemm/x86), always
  present in CPU builds; fast eagerly, but dynamo cannot trace them, so the step stays eager.
- `"torchao"`: torchao's `Int8DynamicActivationInt8WeightConfig` (optional: `pip install torchao`);
  slow eagerly, fast compiled (inductor with freezing lowers it to oneDNN int8 GEMMs).

The two quantize activations differently (torch: per tensor, asymmetric, 7-bit range; torchao: per
token, symmetric), so their logits differ slightly; quality against fp32 is in docs/benchmarks.md.
The copy shares nothing with the original that it could change: the fp32 model stays as it was.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from .errors import WiolaError

QUANTIZE_CHOICES = ("int8", "int4")  # int4: the ONNX engine only (wiola.export.onnx_quant)
MIN_DIM = 32  # smaller linears stay fp32: no speed to gain and a large relative rounding error


def check_quantize(quantize: str | None) -> str | None:
    """None/"none"/"" → None; "int8" / "int4" → itself; anything else: a one-line error."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise WiolaError(f"--quantize must be one of none, {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")
    return quantize


def torchao_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torchao") is not None
    except (ImportError, ValueError):
        return False


def _targets(model: nn.Module) -> list[str]:
    # the article's AGU/F3N MLPs slice and gather their weights (F3N levels, AGU's sparse decode path), so their
    # linears stay fp32
    direct = [name + "." for name, module in model.named_modules() if type(module).__name__ == "GatedUnitsMLP"]
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and min(module.in_features, module.out_features) >= MIN_DIM
            and not any(name.startswith(prefix) for prefix in direct)]


def quantize_int8(model: nn.Module, backend: str = "torch") -> nn.Module:
    """An int8 copy of `model` for inference (see the module docstring); `backend` is "torch" or "torchao"."""
    if next(model.parameters()).device.type != "cpu":
        raise WiolaError("int8 quantization runs on CPU only (its kernels are CPU kernels); use --device cpu")
    targets = _targets(model)
    if backend == "torch":
        with warnings.catch_warnings():  # torch.ao's eager quantization announces its move to torchao (import and call)
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantized = quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in targets}, dtype=torch.qint8, inplace=False)
        return quantized.eval()
    if backend == "torchao":
        if not torchao_available():
            raise WiolaError("the torchao backend needs torchao (pip install torchao)")
        # torchao probes for CUDA-only extension libraries on import and logs each miss; none matter on CPU
        previous = logging.getLogger("torchao").level
        logging.getLogger("torchao").setLevel(logging.ERROR)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        finally:
            logging.getLogger("torchao").setLevel(previous)
        quantized = copy.deepcopy(model).eval()
        chosen = set(targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda module, name: name in chosen)
        return quantized
    raise WiolaError(f"unknown int8 backend {backend!r} (torch or torchao)")
