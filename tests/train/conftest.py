"""Fixtures for the training tests: one tiny prepared dataset and a tiny model config per session."""

from __future__ import annotations

import pytest

from .tinyrun import make_dataset, write_model_config


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def model_config(tmp_path_factory):
    return write_model_config(tmp_path_factory.mktemp("cfg") / "tiny.json")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one intra-op thread than on two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
