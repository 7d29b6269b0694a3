"""`wiola export --to onnx` traces its one-token body in a forked child while it traces the other
(`to_onnx._TokenTrace`): the joined graph is the one the two traces make one after the other, and a child that
fails costs only time."""

from __future__ import annotations

import hashlib
import os

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (wiola[export]): ONNX export not tested")
import onnx  # noqa: E402

from tests.export.conftest import save_model  # noqa: E402
from wiola import WiolaForCausalLM  # noqa: E402
from wiola.export import to_onnx  # noqa: E402
from wiola.export.onnx_branch import bodies  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="the parallel trace needs Linux and two cores")


def _export(model, folder, monkeypatch, parallel: bool) -> tuple[list, int]:
    """Export `model` with both bodies into `folder`; returns (each body's operators in order, the weights by content)
    and how many traces this process ran."""
    monkeypatch.setenv("WIOLA_ONNX_ONE_TOKEN_BODY", "1")
    monkeypatch.setenv(to_onnx.PARALLEL_TRACE_ENV, "1" if parallel else "0")
    traced = []
    real = to_onnx.export_program
    monkeypatch.setattr(to_onnx, "export_program", lambda m, one_token=False: traced.append(one_token) or real(m, one_token))
    folder.mkdir()
    to_onnx.export_onnx(model, folder / "no-tokenizer", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "wiola_onnx.json"]  # the child's files are gone
    graph = onnx.load(str(folder / "model.onnx"))
    ops = [[node.op_type for node in body.node] for body in bodies(graph)]
    weights = sorted(hashlib.sha256(init.raw_data).hexdigest() for init in graph.graph.initializer)
    return (ops, weights), len(traced)


@pytest.fixture(scope="module")
def model(tmp_path_factory, char_tokenizer):
    src = save_model(tmp_path_factory.mktemp("parallel") / "seed", char_tokenizer, "seed")
    return WiolaForCausalLM.from_pretrained(src).eval()


@pytest.fixture(scope="module")
def one_by_one(model, tmp_path_factory):
    """The graph of the two traces run in turn in this process."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        graph, traces = _export(model, tmp_path_factory.mktemp("sequential") / "onnx", monkeypatch, parallel=False)
    assert traces == 2
    return graph


def test_the_forked_trace_gives_the_graph_of_two_traces_in_turn(model, one_by_one, tmp_path, monkeypatch):
    both, traces = _export(model, tmp_path / "parallel", monkeypatch, parallel=True)
    assert traces == 1  # the one-token body came from the child
    assert both == one_by_one  # the same operators in each body, the same weights, stored once


def test_a_failed_child_costs_time_not_the_export(model, one_by_one, tmp_path, monkeypatch):
    def fail(model, path):
        raise RuntimeError("the child fails")

    monkeypatch.setattr(to_onnx, "_trace_token_body", fail)  # (the fork runs the patched function)
    fallback, traces = _export(model, tmp_path / "fallback", monkeypatch, parallel=True)
    assert traces == 2 and fallback == one_by_one
    assert to_onnx.check_against_torch(model, tmp_path / "fallback") <= to_onnx.CHECK_TOLERANCE


def test_a_failed_export_ends_its_child(model, tmp_path, monkeypatch):
    """The any-length trace fails while the child still traces: the export raises, and the child is ended with it
    (not left to trace for nothing)."""
    started = []
    real = to_onnx._TokenTrace.__init__

    def init(self, *args):
        real(self, *args)
        started.append(self)

    def fail(model, one_token=False):
        raise RuntimeError("the trace fails")

    monkeypatch.setenv("WIOLA_ONNX_ONE_TOKEN_BODY", "1")
    monkeypatch.setenv(to_onnx.PARALLEL_TRACE_ENV, "1")
    monkeypatch.setattr(to_onnx._TokenTrace, "__init__", init)
    monkeypatch.setattr(to_onnx, "export_program", fail)
    monkeypatch.setattr(to_onnx, "_trace_token_body", lambda model, path: __import__("time").sleep(120))  # a child still at work
    with pytest.raises(RuntimeError, match="the trace fails"):
        to_onnx.export_onnx(model, tmp_path / "no-tokenizer", tmp_path)
    assert len(started) == 1 and started[0].process is not None and not started[0].process.is_alive()
    assert list(tmp_path.iterdir()) == []  # nothing left of the child's work


def test_an_onnxruntime_session_left_for_the_collector_does_not_stall_the_child(model, one_by_one, tmp_path, monkeypatch):
    """A process that ran an onnxruntime session and dropped it (in a reference cycle, so only the garbage collector
    frees it) then exports: a collection in the forked child must not free it (its destructor would wait forever on
    thread-pool threads the fork did not copy; the export would wait out the child's timeout, then trace again)."""
    import gc
    import time

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # (a thread pool of its own)
    session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones(4, np.float32)})
    time.sleep(0.5)  # (its worker stops spinning and waits)
    cycle = [session]
    cycle.append(cycle)
    del session, cycle
    real = to_onnx.export_program

    def collecting(m, one_token=False):
        if one_token:  # in the child: the collection a long trace runs sooner or later
            gc.collect()
        return real(m, one_token)

    monkeypatch.setattr(to_onnx, "export_program", collecting)
    monkeypatch.setattr(to_onnx._TokenTrace, "result", lambda self, wait=to_onnx._TokenTrace.result: (  # no minute's grace
        self.process.join(timeout=60) if self.process is not None else None) or wait(self))
    gc.disable()  # (the session stays uncollected here until the fork; an explicit collect still runs in the child)
    try:
        both, traces = _export(model, tmp_path / "after-a-session", monkeypatch, parallel=True)
    finally:
        gc.enable()
        gc.collect()
    assert traces == 1 and both == one_by_one  # the child's trace was used
