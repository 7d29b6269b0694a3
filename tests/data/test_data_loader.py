"""The batch loader: windows and labels, determinism, state save/restore, rank slicing, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wiola.data.loader import RandomBatchSampler, TokenDataset
from wiola.errors import WiolaError

N_TRAIN, N_VAL = 5000, 1003


def make_prepared(root: Path, train: np.ndarray, val: np.ndarray) -> Path:
    """A minimal prepared directory (manifest + memmaps), independent of `prepare`."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, tokens in (("train", train), ("val", val)):
        tokens.astype(np.uint16).tofile(root / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "num_tokens": int(tokens.size), "num_documents": 1}
    manifest = {"dtype": "uint16", "vocab_size": 65536, "eos_token_id": 1, "splits": splits, "fingerprint": "x"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # Token i has the value i, so a window's content reveals its offset.
    return make_prepared(tmp_path_factory.mktemp("prepared"), np.arange(N_TRAIN), np.arange(N_VAL) + 10000)


def test_dataset_memmaps_the_split(data):
    train, val = TokenDataset(data), TokenDataset(data, "val")
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert isinstance(train.tokens, np.memmap) and not train.tokens.flags.writeable
    assert train.vocab_size == 65536 and train.eos_token_id == 1
    with pytest.raises(WiolaError, match="no split 'test'"):
        TokenDataset(data, "test")


def test_batches_are_shifted_windows(data):
    sampler = RandomBatchSampler(TokenDataset(data), batch_size=16, seq_len=32, seed=3)
    for _ in range(20):
        x, y = next(sampler)
        assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # labels are the next tokens
        assert torch.equal(x, x[:, :1] + torch.arange(32))  # contiguous windows
        assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= N_TRAIN - 1
    starts = np.concatenate([sampler.global_offsets(s) for s in range(2000)])
    assert starts.min() == 0 and starts.max() == N_TRAIN - 33  # every offset is reachable, none overflows


def test_sampler_is_deterministic_and_seeded(data):
    ds = TokenDataset(data)
    first = RandomBatchSampler(ds, 8, 16, seed=5)
    second = RandomBatchSampler(ds, 8, 16, seed=5)
    other = RandomBatchSampler(ds, 8, 16, seed=6)
    for _ in range(5):
        x1, y1 = next(first)
        x2, y2 = next(second)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert not torch.equal(x1, next(other)[0])


def test_state_save_and_restore(data):
    ds = TokenDataset(data)
    sampler = RandomBatchSampler(ds, 8, 16, seed=11)
    for _ in range(3):
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(4)]
    restored = RandomBatchSampler(ds, 8, 16, seed=0)
    restored.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON-able ints
    for x, y in expected:
        rx, ry = next(restored)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(WiolaError, match="batch size 8"):
        RandomBatchSampler(ds, 4, 16).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_partition_the_global_batch(data, world_size):
    ds = TokenDataset(data)
    single = RandomBatchSampler(ds, 8, 16, seed=2)
    ranks = [RandomBatchSampler(ds, 8, 16, seed=2, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(4):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert all(p[0].shape == (8 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    # Resuming on another world size continues the same global sequence.
    resumed = RandomBatchSampler(ds, 8, 16, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(resumed)[0], next(single)[0][4:])


def test_sampler_argument_errors(data):
    ds = TokenDataset(data)
    with pytest.raises(WiolaError, match="multiple of the world size"):
        RandomBatchSampler(ds, 6, 16, world_size=4)
    with pytest.raises(WiolaError, match="invalid rank"):
        RandomBatchSampler(ds, 8, 16, rank=2, world_size=2)
    with pytest.raises(WiolaError, match="needs at least 5001"):
        RandomBatchSampler(ds, 8, N_TRAIN)


def test_eval_batches_walk_the_split_without_overlap(data):
    val = TokenDataset(data, "val")
    batches = list(val.iter_eval_batches(4, 10))
    windows = (N_VAL - 1) // 10
    assert val.num_eval_windows(10) == windows == 100 and len(batches) == 25
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    tokens = torch.from_numpy(val.tokens.astype(np.int64))
    assert torch.equal(x.flatten(), tokens[: windows * 10]) and torch.equal(y.flatten(), tokens[1 : windows * 10 + 1])
    assert len(list(val.iter_eval_batches(4, 10, max_batches=3))) == 3
    assert [b[0].shape[0] for b in val.iter_eval_batches(32, 10)] == [32, 32, 32, 4]  # last batch is partial


def test_eval_batches_across_ranks(data):
    val = TokenDataset(data, "val")
    whole = list(val.iter_eval_batches(32, 10))
    per_rank = [list(val.iter_eval_batches(32, 10, rank=r, world_size=3)) for r in range(3)]
    assert all(len(p) == len(whole) for p in per_rank)  # every rank takes part in every step
    for g, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[g][0] for p in per_rank]), x)
        assert torch.equal(torch.cat([p[g][1] for p in per_rank]), y)
    last = [p[-1][0].shape[0] for p in per_rank]
    assert last == [2, 1, 1]
    tiny = list(val.iter_eval_batches(8, 10, max_batches=1, rank=0, world_size=16))
    assert tiny[0][0].shape == (1, 10)


def test_missing_or_inconsistent_data(tmp_path, data):
    with pytest.raises(WiolaError, match="run `wiola prepare` first"):
        TokenDataset(tmp_path)
    broken = make_prepared(tmp_path / "broken", np.arange(100), np.arange(10))
    (broken / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(WiolaError, match="does not have the 100 tokens"):
        TokenDataset(broken)
    with pytest.raises(WiolaError, match="has 10 tokens"):
        list(TokenDataset(broken, "val").iter_eval_batches(2, 10))
