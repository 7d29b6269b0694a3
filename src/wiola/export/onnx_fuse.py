"""Fused operators for the exported step graph (`wiola export --to onnx`, graph format 2): rewrites of the ONNX
graph that `torch.onnx.export` writes, run before it is saved. The torch model is untouched; the rewritten
graph computes the same function with fewer, larger onnxruntime kernels (at batch-1 decoding a step is mostly
per-operator overhead, so the node count is what costs).

* `fuse_rms_norms`: the exporter writes `F.rms_norm(x) * weight` (`WiolaRMSNorm`) as
  `Pow → ReduceMean → Add(ε) → Sqrt → Reciprocal → Mul(x, ·) → Mul(weight, ·)`; it becomes one
  `SimplifiedLayerNormalization(x, weight)` (onnxruntime's RMSNorm, registered in the ONNX domain, statistics in
  float32). onnxruntime's own optimizer does not match this form (it expects a `Div`).
* `fuse_skip_norms`: a residual `Add(a, b)` whose sum feeds such a norm becomes onnxruntime's
  `SkipSimplifiedLayerNormalization(a, b, weight)` (com.microsoft), whose fourth output is the sum itself for
  the rest of the graph (the next residual).

Only exact shapes of the pattern are rewritten (fp32 statistics, the last axis, a 1-D weight, no other reader of
an intermediate); anything else — `wiola_rmsnorm`'s offset is fused without the skip, the HLN norms not at all —
stays as exported. The rewritten graph is checked against PyTorch by the export's usual check.
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


def _match_rms(graph, index: _Index, recip) -> dict | None:
    """The RMSNorm around the `Reciprocal` node `recip`: x, ε, the weight and the nodes it spans (or None)."""
    sqrt = index.made_by(recip.input[0], "Sqrt")
    add = sqrt and index.made_by(sqrt.input[0], "Add")
    if add is None:
        return None
    mean = next((index.producer.get(i) for i in add.input if index.made_by(i, "ReduceMean")), None)
    if mean is None:
        return None
    eps = _constant(graph, _other(add, mean.output[0]))
    pow_ = index.made_by(mean.input[0], "Pow")
    if eps is None or eps.size != 1 or pow_ is None:
        return None
    exponent = _constant(graph, pow_.input[1])
    axes = _constant(graph, mean.input[1]) if len(mean.input) > 1 else None
    keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
    x = pow_.input[0]
    shape = index.shape(x)
    if shape is None or exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0 or keepdims != 1:
        return None
    if axes is None or list(axes.reshape(-1)) not in ([-1], [len(shape) - 1]):
        return None
    scale = index.only_reader(recip.output[0])
    if scale is None or scale.op_type != "Mul" or _other(scale, recip.output[0]) != x:
        return None
    weigh = index.only_reader(scale.output[0])
    if weigh is None or weigh.op_type != "Mul":
        return None
    weight = _other(weigh, scale.output[0])
    value = _constant(graph, weight)
    if value is None or value.shape != shape[-1:] or value.dtype != np.float32:
        return None
    chain = [pow_, mean, add, sqrt, recip, scale]
    if any(index.only_reader(n.output[0]) is None for n in chain):  # an intermediate read elsewhere: leave it
        return None
    return {"x": x, "eps": float(eps.reshape(-1)[0]), "weight": weight, "nodes": chain + [weigh], "out": weigh.output[0]}


def fuse_rms_norms(model) -> int:
    """Rewrite each exported RMSNorm (see the module docstring) as one `SimplifiedLayerNormalization`; returns how many."""
    from onnx import helper

    graph = model.graph
    fused = 0
    while True:
        index = _Index(graph)
        found = next((m for node in graph.node if node.op_type == "Reciprocal" for m in [_match_rms(graph, index, node)] if m), None)
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


def fuse(model) -> dict[str, int]:
    """Every rewrite above, in place; returns the count of each."""
    return {"rms_norm": fuse_rms_norms(model), "skip_rms_norm": fuse_skip_norms(model)}
