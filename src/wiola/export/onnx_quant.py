"""Block-wise int8 / int4 weights for the ONNX step graph (`wiola export --to onnx --quantize`, the ONNX engine's
`quantize`): the Q8_0 / Q4_0 class of llama.cpp, on onnxruntime's `MatMulNBits` contrib operator.

Every MatMul of the exported float32 graph whose second input is a constant weight `[K, N]` with K ≥ `BLOCK_SIZE`
(the attention projections, the MLPs, the LM head) becomes a `MatMulNBits`: the weight is stored in blocks of
`BLOCK_SIZE` values along K, each block symmetric (no zero point) with one float32 scale, as 8- or 4-bit integers.
`ACCURACY_LEVEL` 4 lets onnxruntime quantize the activations to int8 per block too, so the product runs on the
CPU's integer dot products (AVX2/AVX-VNNI/AVX-512); that is where the speed comes from. Smaller MatMuls (a head-sized
gate, K < `BLOCK_SIZE`) and everything else (embedding table, norms, attention over the cache) stay float32.
A tied LM head is exported as `MatMul(x, Transpose(embedding))`: its transposed copy becomes a constant first
(`untie_head`), so the largest MatMul of a small model is quantized too and no step transposes the table.

A graph of two bodies (graph format 3, `onnx_branch`) is split, each body quantized alone, and joined again: the
weights they share are quantized the same way, so they are still stored once.

The quantized folder is the float32 export with its graph replaced and `"quantize": "int8"|"int4"` in
`wiola_onnx.json`; `onnx_run` runs it unchanged (onnxruntime's CPU provider implements `MatMulNBits`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from wiola.errors import WiolaError
from wiola.export.onnx_branch import join, joined, split

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # as llama.cpp's Q8_0 / Q4_0
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (per block), integer dot products
GRAPH = "model.onnx"
METADATA = "wiola_onnx.json"
EXTERNAL_AT = 1 << 31  # graphs past 2 GB keep their weights in GRAPH + ".data"


def quantized_kind(folder: Path) -> str | None:
    """The quantization a `wiola export --to onnx` folder's metadata names (None: float32)."""
    return json.loads((Path(folder) / METADATA).read_text()).get("quantize")


def _weights(graph) -> dict:
    return {i.name: i for i in graph.initializer}


def untie_head(model) -> int:
    """Give every `MatMul(x, Transpose(W))` with W a 2-D initializer (a tied LM head) the constant W.T instead,
    and drop the Transposes left unused. Returns the number of MatMuls rewired."""
    from onnx import numpy_helper

    graph = model.graph
    weights = _weights(graph)
    producers = {out: node for node in graph.node for out in node.output}
    rewired = 0
    for node in graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in weights:
            continue
        perm = [list(a.ints) for a in source.attribute if a.name == "perm"]
        weight = weights[source.input[0]]
        if len(weight.dims) != 2 or (perm and perm[0] != [1, 0]):
            continue
        name = source.input[0] + "_transposed"
        if name not in weights:
            weights[name] = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name)
            graph.initializer.append(weights[name])
        node.input[1] = name
        rewired += 1
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]:
        graph.node.remove(node)
    return rewired


def targets(model) -> list[str]:
    """The names of the MatMul nodes to quantize: a constant 2-D weight with K ≥ `BLOCK_SIZE`."""
    weights = _weights(model.graph)
    chosen = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            dims = list(weights[node.input[1]].dims)
            if len(dims) == 2 and dims[0] >= BLOCK_SIZE:
                chosen.append(node.name)
    return chosen


def _quantizer():
    """onnxruntime's `MatMulNBitsQuantizer`, imported without the side effect of its module: it calls
    `logging.basicConfig(level=INFO)`, which would print every library's INFO records from then on."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    return MatMulNBitsQuantizer


def _quantize(model, kind: str, quantizer_class) -> tuple:
    """`model` (one plain step graph) with `kind` weights, and the number of MatMuls quantized."""
    untie_head(model)
    names = targets(model)
    if not names:
        raise WiolaError("the graph has no MatMul with a constant weight to quantize")
    quiet = logging.getLogger("onnxruntime.quantization")  # one INFO line per node otherwise
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer = quantizer_class(model, bits=BITS[kind], block_size=BLOCK_SIZE, is_symmetric=True,
                                    accuracy_level=ACCURACY_LEVEL, nodes_to_include=names, op_types_to_quantize=("MatMul",))
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantized = quantizer.model.model
    return quantized, sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)


def quantize_folder(source: Path, dest: Path, kind: str) -> int:
    """Write into `dest` the export in `source` with `kind` ("int8" or "int4") weights; `dest` may be `source`
    (quantized in place). Returns the number of MatMuls quantized."""
    import onnx

    MatMulNBitsQuantizer = _quantizer()
    if kind not in BITS:
        raise WiolaError(f"unknown weight quantization {kind!r}; choose int8 or int4")
    source, dest = Path(source), Path(dest)
    meta = json.loads((source / METADATA).read_text())
    if meta.get("quantize"):
        raise WiolaError(f"{source} is already quantized ({meta['quantize']}); quantize the float32 export")
    model = onnx.load(str(source / meta["graph"]))
    if joined(model):  # graph format 3: quantize each body alone, then share what they have in common again
        (chunk, done), (token, _) = (_quantize(body, kind, MatMulNBitsQuantizer) for body in split(model))
        quantized = join(chunk, token)
    else:
        quantized, done = _quantize(model, kind, MatMulNBitsQuantizer)
    if source != dest:
        dest.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():  # the tokenizer files (the graph and metadata are written below)
            if path.is_file() and path.name not in (meta["graph"], meta["graph"] + ".data", METADATA, "wiola_cache.json"):
                shutil.copyfile(path, dest / path.name)
    (dest / (GRAPH + ".data")).unlink(missing_ok=True)
    big = quantized.ByteSize() >= EXTERNAL_AT
    onnx.save_model(quantized, str(dest / GRAPH), save_as_external_data=big, location=GRAPH + ".data" if big else None)
    meta.update(graph=GRAPH, quantize=kind, quantization={"op": "MatMulNBits", "bits": BITS[kind], "block_size": BLOCK_SIZE,
                                                           "symmetric": True, "accuracy_level": ACCURACY_LEVEL, "matmuls": done})
    (dest / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    return done
