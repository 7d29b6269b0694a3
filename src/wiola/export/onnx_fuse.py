"""Fused operators for the exported step graph (`wiola export --to onnx`, graph format 2): rewrites of the opset-23
ONNX graph that `torch.onnx.export` writes, run before it is saved. The torch model is untouched; the rewritten
graph computes the same function with fewer, larger onnxruntime kernels (at batch-1 decoding a step is mostly
per-operator overhead, so the node count is what costs).

* `fuse_rms_norms`: `F.rms_norm(x) * weight` (`WiolaRMSNorm`) is exported as `RMSNormalization(x, ones)` with a
  scale of ones the size of x (`ConstantOfShape(Shape(x))`), then `Mul(weight, ·)`; it becomes one
  `SimplifiedLayerNormalization(x, weight)` (onnxruntime's RMSNorm, registered in the ONNX domain, statistics in
  float32).
* `fuse_skip_norms`: a residual `Add(a, b)` whose sum feeds such a norm becomes onnxruntime's
  `SkipSimplifiedLayerNormalization(a, b, weight)` (com.microsoft), whose fourth output is the sum itself for
  the rest of the graph (the next residual).
* `attend_grouped`: opset 23's `Attention` (what the exporter makes of `scaled_dot_product_attention`) is fed the
  key/value buffers before `repeat_kv` copied their heads (it groups query heads itself).
* `fuse_rotary`: `apply_rotary` (`x·cos + roll(x, d_h/2)·sin`, tables `[c, c]` and `[−s, s]`) becomes opset 23's
  `RotaryEmbedding(x, c, s)`.
* `prune`: the nodes and initializers left unread.

Only exact shapes of each pattern are rewritten (float32, the last axis, a 1-D weight, no other reader of an
intermediate); anything else — `wiola_rmsnorm`'s offset is fused without the skip, the HLN norms, ATM and GCLA not
at all — stays as exported. The rewritten graph is checked against PyTorch by the export's usual check.
"""

from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"


def _constant(graph, name: str):
    """The value of `name` when it is an initializer or a Constant node's output (else None)."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


class _Index:
    """Who produces and who reads each value of a graph (rebuilt after each rewrite)."""

    def __init__(self, graph):
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.types = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}

    def shape(self, name: str) -> tuple | None:
        """`name`'s float32 shape as recorded by the exporter (ints and symbols), None when not recorded or not float32."""
        t = self.types.get(name)
        if t is None or t.elem_type != 1 or not t.HasField("shape"):
            return None
        return tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)

    def only_reader(self, name: str):
        """The single node reading `name` (None when it has several readers or is a graph output)."""
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def made_by(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _other(node, name: str) -> str:
    """The other input of a binary node, one of whose inputs is `name`."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _fold_rms(graph, index: _Index, rms) -> dict | None:
    """`Mul(weight, RMSNormalization(x, ConstantOfShape(Shape(x))))` around the node `rms`: x, the weight, ε and the
    nodes it spans (or None). The exporter gives `F.rms_norm` without a weight a scale of ones the size of x."""
    ones = index.made_by(rms.input[1], "ConstantOfShape") if len(rms.input) > 1 else None
    shape_of = ones and index.made_by(ones.input[0], "Shape")
    if shape_of is None or shape_of.input[0] != rms.input[0] or any(a.name in ("start", "end") and a.i != 0 for a in shape_of.attribute):
        return None
    fill = next((a.t for a in ones.attribute if a.name == "value"), None)
    if fill is None or _constant_of(fill) != 1.0 or next((a.i for a in rms.attribute if a.name == "axis"), -1) not in (-1, _rank(index, rms.input[0]) - 1):
        return None
    weigh = index.only_reader(rms.output[0])
    if weigh is None or weigh.op_type != "Mul" or len(rms.output) != 1:
        return None
    weight = _other(weigh, rms.output[0])
    value = _constant(graph, weight)
    x_shape = index.shape(rms.input[0])
    if value is None or x_shape is None or value.shape != x_shape[-1:] or value.dtype != np.float32:
        return None
    if index.only_reader(ones.output[0]) is not rms or index.only_reader(shape_of.output[0]) is not ones:
        return None
    eps = next((a.f for a in rms.attribute if a.name == "epsilon"), 1e-5)
    return {"x": rms.input[0], "eps": eps, "weight": weight, "nodes": [shape_of, ones, rms, weigh], "out": weigh.output[0]}


def _constant_of(tensor) -> float | None:
    from onnx import numpy_helper

    value = numpy_helper.to_array(tensor).reshape(-1)
    return float(value[0]) if value.size == 1 else None


def _rank(index: _Index, name: str) -> int:
    shape = index.shape(name)
    return len(shape) if shape is not None else 0


def fuse_rms_norms(model) -> int:
    """Rewrite each exported RMSNorm times its weight (see the module docstring) as one
    `SimplifiedLayerNormalization(x, weight)`; returns how many."""
    from onnx import helper

    graph = model.graph
    fused = 0
    while True:
        index = _Index(graph)
        found = next((m for node in graph.node if node.op_type == "RMSNormalization" for m in [_fold_rms(graph, index, node)] if m), None)
        if found is None:
            return fused
        at = min(list(graph.node).index(n) for n in found["nodes"])
        for node in found["nodes"]:
            graph.node.remove(node)
        norm = helper.make_node("SimplifiedLayerNormalization", [found["x"], found["weight"]], [found["out"]],
                                name=f"wiola_rms_norm_{fused}", axis=-1, epsilon=found["eps"], stash_type=1)
        graph.node.insert(at, norm)
        fused += 1


def fuse_skip_norms(model) -> int:
    """Fold the residual `Add` feeding each `SimplifiedLayerNormalization` into a `SkipSimplifiedLayerNormalization`
    when the Add's inputs are computed tensors (not constants: a broadcast bias is no residual) of one recorded
    `[B, T, D]` shape; returns how many."""
    from onnx import helper

    graph = model.graph
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    fused = 0
    index = _Index(graph)
    for norm in [n for n in graph.node if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]:
        add = index.made_by(norm.input[0], "Add")
        if add is None or any(i in constants for i in add.input) or len(norm.output) != 1:
            continue
        shapes = [index.shape(i) for i in add.input]
        if shapes[0] is None or shapes[0] != shapes[1] or len(shapes[0]) != 3:  # SkipSimplifiedLayerNormalization: [B, T, D] both
            continue
        total = add.output[0]
        others = [r for r in index.readers.get(total, []) if r is not norm] or total in index.outputs
        eps = next(a.f for a in norm.attribute if a.name == "epsilon")
        skip = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
                                [norm.output[0], "", "", total if others else ""], name=f"wiola_skip_norm_{fused}",
                                domain=MS_DOMAIN, epsilon=eps)
        at = list(graph.node).index(add)
        graph.node.remove(add)
        graph.node.remove(norm)
        graph.node.insert(at, skip)
        fused += 1
    if fused and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def _repeated(index: _Index, graph, name: str) -> str | None:
    """The key/value buffer `[B, H_kv, L, d]` that `repeat_kv` expanded into `name` (`Reshape(Expand(Unsqueeze(kv, 2)))`), or None."""
    reshape = index.made_by(name, "Reshape")
    expand = reshape and index.made_by(reshape.input[0], "Expand")
    unsqueeze = expand and index.made_by(expand.input[0], "Unsqueeze")
    if unsqueeze is None:
        return None
    axes = _constant(graph, unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
    kv, out = index.shape(unsqueeze.input[0]), index.shape(name)
    if axes is None or list(axes.reshape(-1)) != [2] or kv is None or out is None or len(kv) != 4 or len(out) != 4:
        return None
    heads, kv_heads = out[1], kv[1]
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads > kv_heads > 0 and heads % kv_heads == 0 and out[3] == kv[3]):
        return None
    return unsqueeze.input[0]


def attend_grouped(model) -> int:
    """Feed each `Attention` the key/value buffers before `repeat_kv` copied their heads: opset 23's Attention groups
    query head h with key/value head h // (H / H_kv) itself, as `repeat_kv` does, so every step no longer copies each
    layer's whole cache n_rep times. Returns the number of Attention nodes rewired (the copies are pruned)."""
    graph = model.graph
    index = _Index(graph)
    rewired = 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        key, value = _repeated(index, graph, node.input[1]), _repeated(index, graph, node.input[2])
        if key is None or value is None or any(a.name in ("q_num_heads", "kv_num_heads") for a in node.attribute):
            continue
        node.input[1], node.input[2] = key, value
        rewired += 1
    return rewired


def _ints(graph, name: str) -> list[int] | None:
    value = _constant(graph, name) if name else None
    return None if value is None else [int(v) for v in value.reshape(-1)]


def _half_table(graph, index: _Index, name: str, negated: bool) -> str | None:
    """The `[B, T, d_h/2]` table c behind a rotary operand `Unsqueeze(Concat(c, c), 1)` (`negated`:
    `Unsqueeze(Concat(Neg(c), c), 1)`), or None."""
    unsqueeze = index.made_by(name, "Unsqueeze")
    concat = unsqueeze and index.made_by(unsqueeze.input[0], "Concat")
    if concat is None or _ints(graph, unsqueeze.input[1]) != [1] or len(concat.input) != 2:
        return None
    first, second = concat.input
    half = index.shape(second)
    if half is None or len(half) != 3 or next(a.i for a in concat.attribute if a.name == "axis") not in (-1, 2):
        return None
    if negated:
        neg = index.made_by(first, "Neg")
        return second if neg is not None and neg.input[0] == second else None
    return second if first == second else None


def _rolled_half(graph, index: _Index, name: str) -> str | None:
    """x when `name` is `Concat(x[..., h:], x[..., :h])` along the last axis with h = d_h/2 (torch.roll by half), else None."""
    concat = index.made_by(name, "Concat")
    if concat is None or len(concat.input) != 2:
        return None
    upper, lower = (index.made_by(i, "Slice") for i in concat.input)
    if upper is None or lower is None or upper.input[0] != lower.input[0]:
        return None
    x = upper.input[0]
    shape = index.shape(x)
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] % 2:
        return None
    d, h = shape[3], shape[3] // 2
    if next(a.i for a in concat.attribute if a.name == "axis") not in (-1, 3):
        return None
    def span(node):
        steps = _ints(graph, node.input[4]) if len(node.input) > 4 else [1]
        return _ints(graph, node.input[1]), _ints(graph, node.input[2]), _ints(graph, node.input[3]) if len(node.input) > 3 else None, steps
    (s1, e1, a1, t1), (s2, e2, a2, t2) = span(upper), span(lower)
    if None in (s1, e1, a1, s2, e2, a2) or a1 not in ([-1], [3]) or a2 not in ([-1], [3]) or t1 != [1] or t2 != [1]:
        return None
    return x if s1 == [h] and e1[0] >= d and s2 == [0] and e2 == [h] else None


def fuse_rotary(model) -> int:
    """Rewrite each `apply_rotary` — `x·cos + roll(x, d_h/2)·sin` with the tables `[c, c]` and `[−s, s]` — as one
    opset-23 `RotaryEmbedding(x, c, s)` (rotate-half, `x1·c − x2·s`, `x2·c + x1·s`: the same products); returns how many."""
    from onnx import helper

    graph = model.graph
    index = _Index(graph)
    fused = 0
    for add in [n for n in graph.node if n.op_type == "Add"]:
        muls = [index.made_by(i, "Mul") for i in add.input]
        if None in muls:
            continue
        found = None
        for straight, turned in (muls, muls[::-1]):
            for x_at in (0, 1):
                x, cos = straight.input[x_at], straight.input[1 - x_at]
                for roll_at in (0, 1):
                    if _rolled_half(graph, index, turned.input[roll_at]) != x:
                        continue
                    c, s = _half_table(graph, index, cos, False), _half_table(graph, index, turned.input[1 - roll_at], True)
                    if c is not None and s is not None:
                        found = (x, c, s)
        if found is None or index.only_reader(muls[0].output[0]) is not add or index.only_reader(muls[1].output[0]) is not add:
            continue
        rotary = helper.make_node("RotaryEmbedding", list(found), [add.output[0]], name=f"wiola_rotary_{fused}", interleaved=0)
        graph.node.insert(list(graph.node).index(add), rotary)
        graph.node.remove(add)
        fused += 1
    return fused


def merge_matmuls(model) -> int:
    """Give the MatMuls that read one input with constant 2-D weights of one K (q/k/v projections, an MLP's gate and
    up) one MatMul over the weights side by side `[K, N1 + N2 + …]`, and `Split` its output back: each output column
    is the same dot product, the input is read (and, quantized, its blocks quantized) once. Returns the MatMuls
    removed."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    removed = 0
    for x, nodes in groups.items():
        k = {tuple(weights[n.input[1]].dims)[0] for n in nodes}
        if len(nodes) < 2 or len(k) != 1 or len({weights[n.input[1]].data_type for n in nodes}) != 1:
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        name = f"wiola_merged_{removed}_" + "+".join(n.input[1] for n in nodes)[:120]
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), name))
        sizes = numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), name + "_sizes")
        graph.initializer.append(sizes)
        at = min(list(graph.node).index(n) for n in nodes)
        product = name + "_product"
        merged = helper.make_node("MatMul", [x, name], [product], name=name + "_matmul")
        split = helper.make_node("Split", [product, sizes.name], [n.output[0] for n in nodes], name=name + "_split", axis=-1)
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(at, split)
        graph.node.insert(at, merged)
        removed += len(nodes) - 1
    return removed


def prune(model) -> int:
    """Remove the nodes whose outputs nothing reads (left by the rewrites), then the initializers nothing reads;
    returns how many nodes."""
    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute):
        return 0  # (a subgraph may read outer values by name: not scanned here, so nothing is removed)
    removed = 0
    while True:
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in used for o in node.output if o)]
        if not dead:
            for init in [i for i in graph.initializer if i.name not in used]:
                graph.initializer.remove(init)
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def fuse(model) -> dict[str, int]:
    """Every rewrite above, in place; returns the count of each."""
    counts = {"rms_norm": fuse_rms_norms(model), "skip_rms_norm": fuse_skip_norms(model), "grouped_attention": attend_grouped(model),
              "rotary": fuse_rotary(model), "merged_matmuls": merge_matmuls(model)}
    prune(model)
    return counts
