"""Two traced bodies in one step graph (`wiola export --to onnx`, graph format 3): the step traced for a chunk of
any length and the step traced for a chunk of one token, under one ONNX `If` on the chunk length.

A step traced at a static length of one computes what the any-length trace computes for one token, with fewer
operators: shapes are constants, `if t == 1` branches of the model's code take their one-token form (one rotary
over q and k together, ATM's `_fixed_token`: store then attend, no concatenation of the cache with the chunk), and
onnxruntime folds more. At batch-1 decoding a step costs mostly per operator, so the decode steps run the short
body and the prompt the general one.

* `join(chunk, token)`: the graph `If(Shape(input_ids)[1] == 1, token body, chunk body)`. The two bodies read the
  graph inputs from the outer scope; every initializer moves to the outer graph, once per distinct content (the
  same weights, traced twice, are stored once), and every other name in a body gets the body's prefix (`any/`,
  `one/`) so that no name is defined twice.
* `split(model)`: the two bodies as standalone models again (inputs, outputs and the initializers each reads),
  for rewrites that work on one plain graph (`onnx_quant`); `join` afterwards shares what they still have in
  common (the same weight, quantized twice the same way, is stored once).
* `bodies(model)`: the graphs whose nodes compute the step: [any-chunk body, one-token body], or [the graph] when
  not joined.
* `in_place_names(model, meta, prefill)`: the key/value state a step may write into the very buffer it reads.
"""

from __future__ import annotations

import hashlib

CHUNK, TOKEN = "any/", "one/"  # the prefixes of each body's names


def _key(tensor) -> tuple:
    """What makes two initializers interchangeable: type, shape and bytes."""
    from onnx import numpy_helper

    data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest()


IF_NAME = "wiola_chunk_or_token"


def _if_node(model):
    return next((n for n in model.graph.node if n.op_type == "If" and n.name == IF_NAME), None)


def joined(model) -> bool:
    return _if_node(model) is not None


def bodies(model) -> list:
    """The graphs holding the step's nodes: the `If`'s two bodies when `model` is joined, else its graph."""
    node = _if_node(model)
    if node is None:
        return [model.graph]
    branches = {a.name: a.g for a in node.attribute}
    return [branches["else_branch"], branches["then_branch"]]


def _body(graph, prefix: str, outer: set[str], rename_init: dict[str, str]):
    """`graph`'s nodes as an If body: names it defines get `prefix`, initializers read by their outer name
    (`rename_init`), the graph's outputs (positional) as the body's outputs."""
    from onnx import helper

    defined = {o for n in graph.node for o in n.output if o}
    names = {name: prefix + name for name in defined}
    names.update(rename_init)
    body = helper.make_graph([], graph.name + prefix.strip("/"), [], [])
    for node in graph.node:
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise ValueError(f"cannot join graphs holding subgraphs ({node.op_type} {node.name})")
        copy = body.node.add()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.input[:] = [names.get(i, i) if i else i for i in node.input]
        copy.output[:] = [names.get(o, o) if o else o for o in node.output]
    for info in graph.value_info:
        if info.name in names and info.name in defined:
            copy = body.value_info.add()
            copy.CopyFrom(info)
            copy.name = names[info.name]
    for out in graph.output:
        source = names.get(out.name, out.name)
        if out.name not in defined:  # an outer value (input or initializer) passed straight through: copy it
            source = prefix + out.name + "/passed"
            body.node.append(helper.make_node("Identity", [names.get(out.name, out.name)], [source], name=source))
        copy = body.output.add()
        copy.CopyFrom(out)
        copy.name = source
    missing = {i for n in body.node for i in n.input if i} - {o for n in body.node for o in n.output} - outer
    if missing:
        raise ValueError(f"the body reads names defined nowhere: {sorted(missing)[:3]}")
    return body


def join(chunk, token):
    """One model computing `token`'s graph on one-token chunks and `chunk`'s otherwise (see the module docstring).
    Both must have the same inputs and outputs (names, element types)."""
    from onnx import helper

    if [i.name for i in chunk.graph.input] != [i.name for i in token.graph.input] or \
            [o.name for o in chunk.graph.output] != [o.name for o in token.graph.output]:
        raise ValueError("the two step graphs differ in their inputs or outputs")
    outer_inits, by_key, taken = [], {}, set()
    renames = []
    for model, prefix in ((chunk, CHUNK), (token, TOKEN)):
        rename = {}
        for init in model.graph.initializer:
            key = _key(init)
            if key not in by_key:
                name = prefix + init.name if init.name in taken else init.name
                copy = type(init)()
                copy.CopyFrom(init)
                copy.name = name
                outer_inits.append(copy)
                taken.add(name)
                by_key[key] = name
            rename[init.name] = by_key[key]
        renames.append(rename)
    outer = {i.name for i in chunk.graph.input} | taken
    else_body = _body(chunk.graph, CHUNK, outer, renames[0])
    then_body = _body(token.graph, TOKEN, outer, renames[1])
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["wiola_chunk_length"], name="wiola_chunk_length", start=1, end=2),
        helper.make_node("Constant", [], ["wiola_one"], name="wiola_one", value=helper.make_tensor("one", 7, [1], [1])),
        helper.make_node("Equal", ["wiola_chunk_length", "wiola_one"], ["wiola_is_one_token"], name="wiola_is_one_token"),
        helper.make_node("If", ["wiola_is_one_token"], [o.name for o in chunk.graph.output], name=IF_NAME,
                         then_branch=then_body, else_branch=else_body),
    ]
    graph = helper.make_graph(nodes, chunk.graph.name, list(chunk.graph.input), list(chunk.graph.output), outer_inits)
    merged = helper.make_model(graph, opset_imports=_opsets(chunk, token), ir_version=chunk.ir_version,
                               producer_name=chunk.producer_name, producer_version=chunk.producer_version)
    for prop in chunk.metadata_props:
        merged.metadata_props.add().CopyFrom(prop)
    return merged


def _opsets(*models):
    from onnx import helper

    versions = {}
    for model in models:
        for op in model.opset_import:
            versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    return [helper.make_opsetid(domain, version) for domain, version in versions.items()]


def split(model) -> tuple:
    """The (chunk, token) bodies of a joined model as standalone models (see the module docstring)."""
    from onnx import helper

    if not joined(model):
        raise ValueError("not a joined step graph")
    branches = {a.name: a.g for a in _if_node(model).attribute}
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    out = []
    for body, prefix in ((branches["else_branch"], CHUNK), (branches["then_branch"], TOKEN)):
        taken = set(inits) | {i.name for i in model.graph.input}  # a body may read an outer name its prefix hides
        strip = {}
        for node in body.node:
            for name in node.output:
                if name.startswith(prefix) and name[len(prefix):] not in taken:
                    strip[name] = name[len(prefix):]
        for out_info, info in zip(model.graph.output, body.output):  # the body's outputs get the graph's names back
            strip[info.name] = out_info.name
        graph = helper.make_graph([], body.name, list(model.graph.input), list(model.graph.output))
        read = set()
        for node in body.node:
            if node.op_type == "Identity" and node.output[0].endswith("/passed"):
                graph.node.append(helper.make_node("Identity", list(node.input), [strip[node.output[0]]], name=node.name[len(prefix):]))
            else:
                copy = graph.node.add()
                copy.CopyFrom(node)
                copy.name = node.name[len(prefix):] if node.name.startswith(prefix) else node.name
                copy.output[:] = [strip.get(o, o) for o in node.output]
                copy.input[:] = [strip.get(i, i) for i in node.input]
            read.update(node.input)
        graph.initializer.extend(inits[name] for name in sorted(read & inits.keys()))
        for info in body.value_info:
            if info.name in strip and strip[info.name] not in outputs:
                copy = graph.value_info.add()
                copy.CopyFrom(info)
                copy.name = strip[info.name]
        standalone = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                       producer_name=model.producer_name, producer_version=model.producer_version)
        out.append(standalone)
    return tuple(out)


COPYING_READERS = ("Gather", "GatherElements", "GatherND")  # readers whose output is a new buffer, never a view


def _ancestors(index: int, nodes: list, made: dict) -> set[int]:
    """The indices of the nodes that `nodes[index]` depends on (`made`: value name -> index of the node making it)."""
    seen, stack = set(), [index]
    while stack:
        for name in nodes[stack.pop()].input:
            parent = made.get(name)
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def in_place_names(model, meta: dict, prefill: bool = True) -> list[str]:
    """The keys/values state tensors (names of `meta["state"]`, the export's metadata) that a step may update in
    place: those whose present tensor is written by a ScatterElements over the past tensor (it reads every element
    before writing it, so input and output may be one buffer) and whose past tensor every other node of the body
    that runs reads before that write: a Gather that the ScatterElements depends on (its output a new buffer, made
    before the write; an ATM layer's one-token step gathers the last group to merge it with the new token). A plain
    layer's keys/values qualify in both bodies; an ATM layer's in the one-token body only (its any-length body
    rewrites the compacted groups). Other state ping-pongs between two buffers. Decode steps run the one-token
    body; with `prefill` the any-length body runs on the same buffers too (a prompt chunk) and must allow it as
    well."""
    past, present = meta["past_prefix"], meta["present_prefix"]
    allowed = None
    for graph in bodies(model)[(0 if prefill else -1):]:
        nodes = list(graph.node)
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(nodes):
            for name in node.input:
                readers.setdefault(name, []).append(i)
        made = {out: i for i, node in enumerate(nodes) for out in node.output}
        writer = {outer.name: made.get(inner.name) for outer, inner in zip(model.graph.output, graph.output)}  # by position
        here = []
        for s in meta["state"]:
            name = s["name"]
            w = writer.get(present + name)
            if not (name.endswith((".keys", ".values")) and w is not None and nodes[w].op_type == "ScatterElements"
                    and nodes[w].input[0] == past + name):
                continue
            others = [r for r in readers.get(past + name, []) if r != w]
            before = _ancestors(w, nodes, made) if others else set()
            if all(nodes[r].op_type in COPYING_READERS and r in before for r in others):
                here.append(name)
        allowed = here if allowed is None else [n for n in allowed if n in here]
    return allowed or []
