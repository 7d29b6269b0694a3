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

