"""`wiola.export.onnx_branch`: two step bodies under one `If` on the chunk length, and back.

Hand-built graphs with the name clashes the exporter produces (the same name an initializer in one body and a
computed value in the other; the same constant under two names), run by onnxruntime against each body alone."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (wiola[export]): ONNX export not tested")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (wiola[export]): ONNX export not tested")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from wiola.export.onnx_branch import bodies, join, joined, split  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


def _model(nodes, inits):
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", "t", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 4]),
                               helper.make_tensor_value_info("present.n", TensorProto.FLOAT, ["b", "t", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def chunk_model():
    # logits = input @ W + a (a = 1.5 an initializer), present.n = input (passed straight through)
    return _model([helper.make_node("MatMul", ["input_ids", "w"], ["mm"], name="mm"),
                   helper.make_node("Add", ["mm", "a"], ["logits"], name="add"),
                   helper.make_node("Identity", ["input_ids"], ["present.n"], name="id")],
                  [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array(1.5, np.float32), "a")])


def token_model():
    # the same weight under another name; "a" here is a computed value; "k" holds the chunk's "a" (1.5)
    return _model([helper.make_node("MatMul", ["input_ids", "w_again"], ["a"], name="mm"),
                   helper.make_node("Mul", ["a", "k"], ["logits"], name="mul"),
                   helper.make_node("Neg", ["input_ids"], ["present.n"], name="neg")],
                  [numpy_helper.from_array(W.copy(), "w_again"), numpy_helper.from_array(np.array(1.5, np.float32), "k")])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": x})


@pytest.mark.parametrize("length", [1, 3])
def test_joined_graph_runs_the_one_token_body_on_one_token_and_the_other_on_more(length):
    x = np.random.default_rng(0).standard_normal((2, length, 3)).astype(np.float32)
    merged = join(chunk_model(), token_model())
    assert joined(merged) and not joined(chunk_model())
    expected = run(token_model() if length == 1 else chunk_model(), x)
    for got, want in zip(run(merged, x), expected):
        np.testing.assert_array_equal(got, want)


def test_weights_are_stored_once_and_names_never_clash():
    merged = join(chunk_model(), token_model())
    outer = [init.name for init in merged.graph.initializer]
    assert sorted(outer) == ["a", "w"]  # W and 1.5 once each, under the chunk body's names
    defined = [o for body in bodies(merged) for node in body.node for o in node.output]
    assert len(defined) == len(set(defined)) and not set(defined) & set(outer)
    assert all(not body.initializer and not body.input for body in bodies(merged))


def test_split_gives_each_body_back_as_a_model_and_joins_again():
    x = np.random.default_rng(1).standard_normal((1, 1, 3)).astype(np.float32)
    y = np.random.default_rng(2).standard_normal((1, 4, 3)).astype(np.float32)
    merged = join(chunk_model(), token_model())
    chunk, token = split(merged)
    assert [i.name for i in chunk.graph.input] == ["input_ids"] and [o.name for o in token.graph.output] == ["logits", "present.n"]
    for got, want in zip(run(chunk, y), run(chunk_model(), y)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(run(token, x), run(token_model(), x)):
        np.testing.assert_array_equal(got, want)
    again = join(chunk, token)  # the token body's computed "a" sits beside the outer initializer "a": kept apart
    assert len(again.graph.initializer) == 2
    for data in (x, y):
        for got, want in zip(run(again, data), run(merged, data)):
            np.testing.assert_array_equal(got, want)


def test_graphs_with_different_interfaces_are_refused():
    other = token_model()
    other.graph.output[1].name = "present.m"
    other.graph.node[2].output[0] = "present.m"
    with pytest.raises(ValueError, match="differ in their inputs or outputs"):
        join(chunk_model(), other)


def _cache_step(reader: str | None, before_write: bool = True):
    """A one-token step over a cache `past.0.keys` [1, 4] (slot 1 written): present = ScatterElements(past, slot 1,
    update), with the update 2·x, or, with a `reader` op, reader(past)[slot 0]·x + x (the ATM-like case: the
    last group read, merged with the new value); `before_write` False: the reader's value feeds only the logits,
    so it may run after the write."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(np.array([[1]], np.int64)))]
    if reader is None:
        nodes.append(helper.make_node("Add", ["x", "x"], ["upd"]))
        logits = "upd"
    else:
        nodes.append(helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array([[0]], np.int64))))
        if reader == "GatherElements":
            nodes.append(helper.make_node("GatherElements", ["past.0.keys", "zero"], ["old"], axis=1))
        else:  # a Reshape: onnxruntime may hand back a view of its input
            nodes.append(helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, 4], np.int64))))
            nodes.append(helper.make_node("Reshape", ["past.0.keys", "shape"], ["view"]))
            nodes.append(helper.make_node("GatherElements", ["view", "zero"], ["old"], axis=1))
        nodes.append(helper.make_node("Mul", ["old", "x"], ["merged"]))
        nodes.append(helper.make_node("Add", ["merged", "x"], ["upd" if before_write else "logits_in"]))
        if not before_write:
            nodes.append(helper.make_node("Add", ["x", "x"], ["upd"]))
        logits = "upd" if before_write else "logits_in"
    nodes.append(helper.make_node("ScatterElements", ["past.0.keys", "idx", "upd"], ["present.0.keys"], axis=1))
    nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", f, [1, 1]), helper.make_tensor_value_info("past.0.keys", f, [1, 4])],
                              [helper.make_tensor_value_info("logits", f, [1, 1]), helper.make_tensor_value_info("present.0.keys", f, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


META = {"past_prefix": "past.", "present_prefix": "present.", "state": [{"name": "0.keys"}]}


@pytest.mark.parametrize("reader, before_write, in_place", [(None, True, True), ("GatherElements", True, True),
                                                            ("GatherElements", False, False), ("Reshape", True, False)])
def test_a_cache_is_updated_in_place_only_when_every_other_reader_copies_it_before_the_write(reader, before_write, in_place):
    from wiola.export.onnx_branch import in_place_names

    model = _cache_step(reader, before_write)
    assert in_place_names(model, META) == (["0.keys"] if in_place else [])
    if not in_place:
        return
    # and onnxruntime agrees: the step run on one buffer bound as past and present gives the two-buffer result
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, past = np.array([[3.0]], np.float32), np.array([[2.0, 5.0, 7.0, 0.0]], np.float32)
    want = session.run(None, {"x": x, "past.0.keys": past.copy()})
    buffer = past.copy()
    value = ort.OrtValue.ortvalue_from_numpy(buffer)
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_ortvalue_input("past.0.keys", value)
    binding.bind_output("logits", "cpu")
    binding.bind_ortvalue_output("present.0.keys", value)
    session.run_with_iobinding(binding)
    np.testing.assert_array_equal(binding.get_outputs()[0].numpy(), want[0])
    np.testing.assert_array_equal(buffer, want[1])
