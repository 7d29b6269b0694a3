"""`WiolaCache`: the generation cache (SPEC §4), a transformers `Cache` holding per layer

* keys/values — every processed token, pads included, for plain layers; for ATM layers a compacted
  store of `T' ≤ T` merged groups per row (`lengths[b]` valid slots, pads never stored);
* the GSA running sum of head-mean queries (fp32) and the GCLA running sum of the layer's outputs (fp32);
* for HLN norms, the running sums of token mean squares of the layer's two norms (and, on the last layer,
  of the final norm) (fp32, `[B, 1]`);
* for ATM layers, the last token's attention input and whether it was merged (to pair the next token).

Cache-wide: the token counter returned by `get_seq_length()` (pads included, as generate expects), the
2-D real-token mask of the history and the per-row count of real tokens. Running sums cannot be undone,
so the cache cannot be cropped (assisted decoding is refused) but beam search can reorder it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_wiola import WiolaConfig

SUMS = ("gsa_sum", "out_sum", "hln_in", "hln_post", "hln_final")  # running sums continued by `accumulate`
_ROW_STATE = ("keys", "values", *SUMS, "lengths", "last_x", "last_real", "last_taken")


class WiolaCacheLayer(CacheLayerMixin):
    """One layer's state. Tensors are created on first use; every tensor is indexed by batch row first."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, merging: bool = False):
        super().__init__()
        self.merging = merging
        for name in SUMS:
            setattr(self, name, None)
        self.lengths: torch.Tensor | None = None
        self.last_x: torch.Tensor | None = None
        self.last_real: torch.Tensor | None = None
        self.last_taken: torch.Tensor | None = None

    def __repr__(self):
        return f"WiolaCacheLayer(merging={self.merging}, entries={self.get_seq_length()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def accumulate(self, name: str, running: torch.Tensor) -> torch.Tensor:
        """Continue a running sum `[B, T, n]` (this chunk's cumulative sums) from the cached total in
        `name` (one of `SUMS`), store the new total and return the continued sums."""
        total = getattr(self, name)
        if total is not None:
            running = running + total[:, None]
        setattr(self, name, running[:, -1])
        return running

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append keys/values `[B, H_kv, T, d_h]` (plain layers) and return the whole store."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the abstract name in transformers 5.0 – 5.2x
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def _apply(self, fn) -> None:
        for name in _ROW_STATE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def reset(self) -> None:
        for name in _ROW_STATE:
            setattr(self, name, None)
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("WiolaCache holds running sums and merged tokens; it cannot be cropped")


class WiolaCache(Cache):
    """Cache for `WiolaForCausalLM`; build it with `WiolaCache(config)` or let `generate` do it."""

    is_compileable = False

    def __init__(self, config: WiolaConfig, **kwargs):
        merge = set(config.merge_layers) if config.atm_threshold < 1.0 else set()
        super().__init__(layers=[WiolaCacheLayer(merging=i in merge) for i in range(config.num_hidden_layers)])
        self.seen_tokens = 0
        self.real_mask: torch.Tensor | None = None  # [B, seen_tokens] bool
        self.real_count: torch.Tensor | None = None  # [B] long

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far, pads included (what `generate` uses to slice its inputs)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def merge_ratios(self) -> dict[int, torch.Tensor]:
        """Per ATM layer, per row: μ = 1 − T'/T over the real tokens cached so far."""
        if self.real_count is None:
            return {}
        count = self.real_count.clamp(min=1).to(torch.float32)
        return {i: 1.0 - layer.lengths.to(torch.float32) / count for i, layer in enumerate(self.layers) if layer.merging and layer.lengths is not None}

    def _rows(self, fn) -> None:
        for name in ("real_mask", "real_count"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.seen_tokens, self.real_mask, self.real_count = 0, None, None

    def crop(self, max_length: int) -> None:
        if max_length == 0 and self.seen_tokens == 0:
            return
        raise NotImplementedError("WiolaCache holds running sums and merged tokens; it cannot be cropped (assisted decoding is not supported)")

    @property
    def is_croppable(self) -> bool:
        return False


# --------------------------------------------------------------------------- static (preallocated) cache
class WiolaStaticLayer(CacheLayerMixin):
    """One layer's preallocated state for `WiolaStaticCache`: keys/values `[B, H_kv, L, d_h]` written in
    place at the cache's position tensor (ATM layers: at the row's group count), and fixed-size running
    sums. Nothing is reallocated between decode steps, so a captured decode step replays on the same memory."""

    is_compileable = True
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "WiolaStaticCache", merging: bool):
        super().__init__()
        self.owner, self.merging = owner, merging
        self.static = True
        self.sums: dict[str, torch.Tensor] = {}  # running sums by name (`SUMS`), allocated by `WiolaStaticCache.load`
        self.lengths = self.last_x = self.last_real = self.last_taken = None

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers come from `WiolaStaticCache.load`
        raise RuntimeError("a WiolaStaticCache layer is filled by WiolaStaticCache.load (the prefill), not by update()")

    # running sums, read like `WiolaCacheLayer`'s (`layer.gsa_sum`, …); written only through `accumulate`
    def __getattr__(self, name: str):
        if name in SUMS:
            return self.__dict__.get("sums", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def accumulate(self, name: str, running: torch.Tensor) -> torch.Tensor:
        """One decode step (`running` is `[B, 1, n]`): add it to the stored total in place and return the total."""
        total = self.sums[name]
        total.add_(running[:, 0])
        return total[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write one decode step's keys/values `[B, H_kv, 1, d_h]` at the current position; return the buffers."""
        self.keys.index_copy_(2, self.owner.position, key_states)
        self.values.index_copy_(2, self.owner.position, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return self.owner.capacity

    def get_max_cache_shape(self) -> int:
        return self.owner.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.capacity, 0

    def buffers(self) -> dict[str, torch.Tensor]:
        names = {"keys": self.keys, "values": self.values, **self.sums, "lengths": self.lengths,
                 "last_x": self.last_x, "last_real": self.last_real, "last_taken": self.last_taken}
        return {k: v for k, v in names.items() if v is not None}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for buf in self.buffers().values():
            buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    def reset(self) -> None:
        for buf in self.buffers().values():
            buf.zero_()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("WiolaStaticCache holds running sums and merged tokens; it cannot be cropped")


class WiolaStaticCache(Cache):
    """Preallocated cache for fast decoding: `WiolaStaticCache(config, max_cache_len=...)`, or
    `model.generate(..., cache_implementation="static")`.

    The prompt (any forward of more than one token) runs through the ordinary path on a `WiolaCache` and
    is then copied into fixed buffers of `max_cache_len` slots (`load`); each single-token step afterwards
    runs `WiolaModel`'s static decode path, which writes every piece of state in place and reads the
    position from a device tensor — no Python number changes between steps, so the step compiles once
    (`fullgraph=True`) and can be captured as a CUDA graph. Decode-step tokens count as real tokens (as
    in `generate`). Logits equal those of the `WiolaCache` path (same arithmetic; attention runs over all
    `max_cache_len` slots with the unused ones masked).
    """

    is_compileable = True

    def __init__(self, config: WiolaConfig, max_cache_len: int | None = None, max_batch_size: int | None = None, **kwargs):
        merge = set(config.merge_layers) if config.atm_threshold < 1.0 else set()
        super().__init__(layers=[WiolaStaticLayer(self, i in merge) for i in range(config.num_hidden_layers)])
        self.config = config
        self.capacity = int(max_cache_len or config.max_position_embeddings)  # slots per row
        if self.capacity > config.max_position_embeddings:
            raise ValueError(f"max_cache_len={self.capacity} exceeds max_position_embeddings={config.max_position_embeddings}")
        self.ready = False  # buffers allocated and filled by a prefill
        self.position: torch.Tensor | None = None  # [1] long: tokens processed, pads included
        self.key_real: torch.Tensor | None = None  # [B, L] bool: slot holds a real token
        self.real_count: torch.Tensor | None = None  # [B] long
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin rows of every slot, set by the model

    # ---- transformers Cache API
    @property
    def max_cache_len(self) -> int:  # (a read-only property of `Cache` in transformers 5.17)
        return self.capacity

    def get_max_length(self, layer_idx: int = 0) -> int:
        return self.capacity

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.position) if self.ready else 0  # a device sync; generate calls it only around the prefill

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, max_length: int) -> None:
        if max_length == 0 and not self.ready:
            return
        raise NotImplementedError("WiolaStaticCache holds running sums and merged tokens; it cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.ready:
            return
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        for buf in (self.key_real, self.real_count):
            buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda cache: cache.batch_repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda cache: cache.batch_select_indices(indices))

    def _rebuild(self, fn) -> None:
        if self.ready:
            dynamic = self.to_dynamic()
            fn(dynamic)
            self.load(dynamic)

    def reset(self) -> None:
        if self.ready:
            for layer in self.layers:
                layer.reset()
            self.key_real.zero_()
            self.real_count.zero_()
            self.position.zero_()
        self.ready = False

    def merge_ratios(self) -> dict[int, torch.Tensor]:
        if not self.ready:
            return {}
        count = self.real_count.clamp(min=1).to(torch.float32)
        return {i: 1.0 - layer.lengths.to(torch.float32) / count for i, layer in enumerate(self.layers) if layer.merging}

    # ---- moving state between the growing and the preallocated form
    def to_dynamic(self) -> WiolaCache:
        """The same state as a `WiolaCache` (views of the used slots), e.g. to run a multi-token chunk."""
        dynamic = WiolaCache(self.config)
        if not self.ready:
            return dynamic
        seen = int(self.position)
        dynamic.seen_tokens, dynamic.real_mask, dynamic.real_count = seen, self.key_real[:, :seen].clone(), self.real_count.clone()
        for src, dst in zip(self.layers, dynamic.layers):
            width = int(src.lengths.max()) if src.merging else seen
            dst.lazy_initialization(src.keys, src.values)
            dst.keys, dst.values = src.keys[:, :, :width].clone(), src.values[:, :, :width].clone()
            for name in (*SUMS, "lengths", "last_x", "last_real", "last_taken"):
                value = getattr(src, name)
                setattr(dst, name, None if value is None else value.clone())
        return dynamic

    def load(self, dynamic: WiolaCache) -> None:
        """Copy a `WiolaCache`'s state into the buffers (allocated on first use, or when the batch changes)."""
        seen = dynamic.seen_tokens
        if seen > self.capacity:
            raise ValueError(f"{seen} tokens do not fit a WiolaStaticCache of max_cache_len={self.capacity}")
        first = dynamic.layers[0]
        batch, device = dynamic.real_count.shape[0], dynamic.real_count.device
        if not self.ready or self.key_real.shape[0] != batch or self.key_real.device != device or self.layers[0].keys.dtype != first.keys.dtype:
            self._allocate(dynamic)
        self.position.fill_(seen)
        self.key_real.zero_()
        self.key_real[:, :seen].copy_(dynamic.real_mask)
        self.real_count.copy_(dynamic.real_count)
        for src, dst in zip(dynamic.layers, self.layers):
            width = src.keys.shape[2]
            dst.keys.zero_()
            dst.values.zero_()
            dst.keys[:, :, :width].copy_(src.keys)
            dst.values[:, :, :width].copy_(src.values)
            for name, buf in dst.sums.items():
                buf.copy_(getattr(src, name))
            for name in ("lengths", "last_x", "last_real", "last_taken"):
                buf = getattr(dst, name)
                if buf is not None:
                    buf.copy_(getattr(src, name))
        self.ready = True

    def _allocate(self, dynamic: WiolaCache) -> None:
        def buffer(like: torch.Tensor | None, shape=None) -> torch.Tensor | None:
            if like is None:
                return None
            out = torch.zeros(shape if shape is not None else like.shape, dtype=like.dtype, device=like.device)
            if out.device.type == "cuda" and not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(out)  # CUDA graphs replay on these very buffers
            return out

        batch, device = dynamic.real_count.shape[0], dynamic.real_count.device
        self.position = buffer(torch.zeros(1, dtype=torch.long, device=device))
        self.key_real = buffer(dynamic.real_mask, (batch, self.capacity))
        self.real_count = buffer(dynamic.real_count)
        for src, dst in zip(dynamic.layers, self.layers):
            b, h, _, d = src.keys.shape
            dst.keys = buffer(src.keys, (b, h, self.capacity, d))
            dst.values = buffer(src.values, (b, h, self.capacity, d))
            dst.sums = {name: buffer(getattr(src, name)) for name in SUMS if getattr(src, name) is not None}
            dst.lengths, dst.last_x, dst.last_real, dst.last_taken = (buffer(getattr(src, n)) for n in ("lengths", "last_x", "last_real", "last_taken"))
            dst.is_initialized, dst.dtype, dst.device = True, src.keys.dtype, src.keys.device
