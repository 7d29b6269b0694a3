"""Training under `torch.compile(fullgraph=True)`: every component combination traces into one graph
(no graph break from the gate, GCLA or ATM), forward and backward (AOT autograd), and gives the eager
loss and gradients. `backend="aot_eager"` traces exactly what inductor would compile, without paying
for code generation on CPU; the FlexAttention ATM kernel is traced without gradients (it has no CPU
backward)."""

from __future__ import annotations

import pytest
import torch

from .conftest import build, random_ids
from .test_generation import VARIANTS


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step_compiles_to_one_graph_with_eager_gradients(variant, fresh_dynamo):
    model = build(**VARIANTS[variant]).train()
    ids = random_ids(2, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():  # (layer 0's context projections get no gradient: it has no context)
        assert (grads[name] is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fresh_dynamo["stats"]["unique_graphs"] == 1 and not fresh_dynamo["graph_break"]


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7),
                    reason="torch 2.6's dynamo cannot trace create_block_mask's mask function (measured on 2.6.0: "
                           "'inspect.signature with non-constant function'); a compiled model graph-breaks there")
def test_flex_atm_kernel_traces_without_graph_breaks(fresh_dynamo):
    model = build(**dict(VARIANTS["paper"], atm_kernel="flex")).train()
    ids = random_ids(2, 16)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=ids)
        reference = build(**VARIANTS["paper"]).train()(input_ids=ids, labels=ids)  # the mask kernel
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=1e-5)
    assert not fresh_dynamo["graph_break"]
