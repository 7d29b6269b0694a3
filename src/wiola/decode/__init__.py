"""Decoding for Wiola models: one chooser, small backends behind one step interface, one token loop.

- `choose`: which backend runs, by one rule — on CPU, `engine="auto"` decodes with onnxruntime when this
  model's export is in the engine cache and onnxruntime is installed, otherwise with torch eager; the cache is
  filled by `wiola train` on CPU (at its end), `wiola export --to onnx`, and `engine="onnx"` (or `quantize`), which
  makes the export if missing; compiling is opt-in on CPU.
- `torch_backend`: the model's forward on a `WiolaStaticCache`, eager or compiled, fp32 or int8.
- `onnx_backend`: the model's ONNX export (fp32, int8, int4 block-wise weights) under onnxruntime, cached per
  set of weights, its state in IO-bound buffers.
- `loop`: the token loop (greedy or seeded sampling, end-of-sequence stops and padding, streaming).
- `decoder`: `StaticDecoder`, the four put together.
- `caches`: what the package keeps on disk (torch's compile artifacts) and the identity of a model's config.

Imports run one way: `decoder` → `choose`, `loop`, the backends → `caches`; no backend imports the decoder.
`wiola serve` keeps its own loop (continuous batching, `wiola.serve.engine`) and shares `pick_next`, `choose`'s rule
and the `OnnxEngine` (its decode step, `wiola.serve.steps`, binds the serving cache's buffers as the ONNX state).
"""

from .decoder import StaticDecoder
from .loop import decode_loop, pick_next
from .torch_backend import CompiledStep

__all__ = ["StaticDecoder", "pick_next", "decode_loop", "CompiledStep"]
