"""Block-wise int8 / int4 weights for the ONNX step graph (`wiola export --to onnx --quantize`, the ONNX engine's
`quantize`): the Q8_0 / Q4_0 class of llama.cpp, on onnxruntime's `MatMulNBits` contrib operator.

Every MatMul of the exported float32 graph whose second input is a constant weight `[K, N]` with K ≥ `SMALL_BLOCK`
(the attention projections, the MLPs, the LM head) becomes a `MatMulNBits`: the weight is stored in blocks of
`BLOCK_SIZE` (128) values along K — `SMALL_BLOCK` (32, llama.cpp's Q8_0 / Q4_0 block) where K < 128 — each block
symmetric (no zero point) with one float32 scale, as 8- or 4-bit integers. Blocks of 128 are the usual group size of
int4 weights (GPTQ, AWQ), and onnxruntime's kernels ran a 120M model's step products 1.2× (int8) and 1.5× (int4)
faster with them than with blocks of 32 (docs/benchmarks.md, "Blocks of 128"). `ACCURACY_LEVEL` 4 lets onnxruntime
quantize the activations to int8 per block too, so the product runs on the CPU's integer dot products
(AVX2/AVX-VNNI/AVX-512); that is where the speed comes from. Smaller MatMuls (a head-sized gate, K < `SMALL_BLOCK`)
and everything else (embedding table, norms, attention over the cache) stay float32.
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
BLOCK_SIZE = 128  # values per block along K (the scale's group), where K >= 128
SMALL_BLOCK = 32  # where 32 <= K < 128 (llama.cpp's Q8_0 / Q4_0 block); smaller K stays float32
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


def block_size(k: int) -> int | None:
    """The block size for a weight with `k` rows (the reduced axis), None when it stays float32."""
    return BLOCK_SIZE if k >= BLOCK_SIZE else SMALL_BLOCK if k >= SMALL_BLOCK else None


def targets(model) -> dict[int, list[str]]:
    """The MatMul nodes to quantize (a constant 2-D weight with K ≥ `SMALL_BLOCK`), by block size: their names."""
    weights = _weights(model.graph)
    chosen: dict[int, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            dims = list(weights[node.input[1]].dims)
            if len(dims) == 2 and block_size(dims[0]):
                chosen.setdefault(block_size(dims[0]), []).append(node.name)
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
    """`model` (one plain step graph) with `kind` weights, and the number of MatMuls quantized per block size."""
    untie_head(model)
    chosen = targets(model)
    if not chosen:
        raise WiolaError("the graph has no MatMul with a constant weight to quantize")
    quiet = logging.getLogger("onnxruntime.quantization")  # one INFO line per node otherwise
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for block, names in sorted(chosen.items()):  # one pass per block size (the quantizer takes one)
            # the quantizer takes every MatMul of op_types_to_quantize: the ones of other passes are excluded
            others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
            quantizer = quantizer_class(model, bits=BITS[kind], block_size=block, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                        nodes_to_include=names, nodes_to_exclude=others, op_types_to_quantize=("MatMul",))
            quantizer.process()
            model = quantizer.model.model
    finally:
        quiet.setLevel(level)
    return model, {block: len(names) for block, names in sorted(chosen.items())}


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
                                                           "small_block_size": SMALL_BLOCK, "symmetric": True, "accuracy_level": ACCURACY_LEVEL,
                                                           "matmuls": sum(done.values()), "matmuls_by_block_size": {str(b): n for b, n in done.items()}})
    (dest / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    return sum(done.values())
