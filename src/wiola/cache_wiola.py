"""`WiolaCache`: the generation cache (SPEC §4), a transformers `Cache` holding per layer

* keys/values — every processed token, pads included, for plain layers; for ATM layers a compacted
  store of `T' ≤ T` merged groups per row (`lengths[b]` valid slots, pads never stored);
* the GSA running sum of head-mean queries (fp32) and the GCLA running sum of the layer's outputs (fp32);
* for ATM layers, the last token's attention input and whether it was merged (to pair the next token).

Cache-wide: the token counter returned by `get_seq_length()` (pads included, as generate expects), the
2-D real-token mask of the history and the per-row count of real tokens. Running sums cannot be undone,
so the cache cannot be cropped (assisted decoding is refused) but beam search can reorder it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_wiola import WiolaConfig

_ROW_STATE = ("keys", "values", "gsa_sum", "out_sum", "lengths", "last_x", "last_real", "last_taken")


class WiolaCacheLayer(CacheLayerMixin):
    """One layer's state. Tensors are created on first use; every tensor is indexed by batch row first."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, merging: bool = False):
        super().__init__()
        self.merging = merging
        self.gsa_sum: torch.Tensor | None = None
        self.out_sum: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.last_x: torch.Tensor | None = None
        self.last_real: torch.Tensor | None = None
        self.last_taken: torch.Tensor | None = None

    def __repr__(self):
        return f"WiolaCacheLayer(merging={self.merging}, entries={self.get_seq_length()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

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
