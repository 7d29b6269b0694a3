"""`SlotCache`: the preallocated decode cache of the server, one row per running request.

A `WiolaStaticCache` of `max_batch_size` rows × `capacity` slots is allocated once. The decode step
runs on a *view* of its first B rows (a `WiolaStaticCache` whose buffers are `buffer[:B]`), so it
writes the shared buffers in place; running requests always occupy rows 0..B-1.

All rows share one write position P (the static decode step writes slot P of every row). Plain
attention layers keep a row's tokens at slots [start, P): a request that joins mid-flight is placed
right-aligned at P, its earlier slots left empty (masked, as left padding is). Positions, running
sums and ATM's compacted groups are per row and count real tokens only, so where a row sits does not
change what it computes. Three row operations keep the batch packed:

* `place(row, dynamic, at)`: copy a freshly prefilled batch-1 `WiolaCache` into a row, ending at slot `at`;
* `move(src, dst)`: copy a row (a finished request's row is refilled by the last running one);
* `shift(rows, by)`: move every running row's plain-layer slots right (`by > 0`, to make room for a
  longer prompt than P) or left (`by < 0`, to reclaim slots no running row uses).

With `sets=2` (the ONNX decode step, `wiola.serve.onnx_step`) a second `WiolaStaticCache` of the same shapes is
allocated beside the first: the step reads one set and writes the other (its outputs never alias its inputs), and
`swap()` makes the written set current. `full`, and every row operation above, act on the current set only: the
other set's rows are overwritten whole by the next step before anything reads them. `shared` names layer buffers
("{i}.keys", "{i}.values") that both sets hold in one tensor: the step updates those in place (one slot per
step instead of a copy of the whole cache), and so do the row operations, whichever set is current.
"""

from __future__ import annotations

import torch

from ..cache_wiola import ATM_STATE, WiolaCache, WiolaStaticCache

# the per-row buffers of a WiolaStaticLayer besides keys/values are its running sums (`layer.sums`, by the
# names the dynamic WiolaCacheLayer uses: gsa_sum, out_sum, hln_*) and the ATM state (`ATM_STATE`)


class SlotCache:
    """Preallocated rows for continuous batching on a `WiolaForCausalLM` (see the module docstring)."""

    def __init__(self, model, max_batch_size: int, capacity: int, sets: int = 1, shared: frozenset[str] = frozenset()):
        if sets not in (1, 2):
            raise ValueError(f"a SlotCache holds 1 or 2 buffer sets, not {sets}")
        self.model, self.rows, self.capacity = model, max_batch_size, capacity
        self.config = model.config
        self.sets = [self._allocate(model, max_batch_size, capacity) for _ in range(sets)]
        if sets == 2:  # layer buffers both sets hold in one tensor ("{i}.keys", "{i}.values": updated in place)
            for name in shared:
                index, _, field = name.partition(".")
                setattr(self.sets[1].layers[int(index)], field, getattr(self.sets[0].layers[int(index)], field))
        self.current = 0  # the set holding the state
        self._views: dict[tuple[int, int], WiolaStaticCache] = {}

    def _allocate(self, model, max_batch_size: int, capacity: int) -> WiolaStaticCache:
        full = WiolaStaticCache(self.config, max_cache_len=capacity)
        device = next(model.parameters()).device
        start = self.config.bos_token_id if self.config.bos_token_id is not None else 0
        with torch.no_grad():  # a one-token prefill of every row allocates the buffers and the rotary table
            model(input_ids=torch.full((max_batch_size, 1), start, dtype=torch.long, device=device), cache=full, use_cache=True,
                  logits_to_keep=1)
        for layer in full.layers:
            for buf in layer.buffers().values():
                buf.zero_()
        full.key_real.zero_()
        full.real_count.zero_()
        full.position.zero_()
        return full

    @property
    def full(self) -> WiolaStaticCache:
        """The current buffer set (the whole `max_batch_size` rows)."""
        return self.sets[self.current]

    @property
    def spare(self) -> WiolaStaticCache | None:
        """The other buffer set (`sets=2`): where the next ONNX step writes."""
        return self.sets[1 - self.current] if len(self.sets) == 2 else None

    def swap(self) -> None:
        """Make the spare set current (after a step wrote the state there)."""
        if len(self.sets) != 2:
            raise ValueError("swap needs a SlotCache of 2 buffer sets")
        self.current = 1 - self.current

    @property
    def position(self) -> torch.Tensor:
        return self.full.position

    def bytes(self) -> int:
        """Memory held by the preallocated buffers (every set)."""
        every = {}
        for full in self.sets:
            for t in (full.key_real, full.real_count, full.position, *(b for layer in full.layers for b in layer.buffers().values())):
                every[id(t)] = t.numel() * t.element_size()
        return sum(every.values())

    def view(self, batch: int) -> WiolaStaticCache:
        """A `WiolaStaticCache` over rows 0..batch-1 of the current set's buffers (built once per batch size and set)."""
        if (self.current, batch) not in self._views:
            view = WiolaStaticCache(self.config, max_cache_len=self.capacity)
            full = self.full
            view.ready, view.position, view.rotary = True, full.position, full.rotary
            view.key_real, view.real_count = full.key_real[:batch], full.real_count[:batch]
            for src, dst in zip(full.layers, view.layers):
                for name in ("keys", "values", *ATM_STATE):
                    buf = getattr(src, name)
                    if buf is not None:
                        setattr(dst, name, buf[:batch])
                dst.sums = {name: buf[:batch] for name, buf in src.sums.items()}
                dst.is_initialized, dst.dtype, dst.device = True, src.dtype, src.device
            self._views[self.current, batch] = view
        return self._views[self.current, batch]

    def set_position(self, value: int) -> None:
        self.full.position.fill_(value)

    def place(self, row: int, dynamic: WiolaCache, at: int) -> None:
        """Write a batch-1 `WiolaCache` of n tokens (no padding) into `row`, its tokens at slots [at - n, at)."""
        n = dynamic.seen_tokens
        if not 0 < n <= at <= self.capacity:
            raise ValueError(f"cannot place {n} tokens ending at slot {at} of {self.capacity}")
        full = self.full
        full.key_real[row].zero_()
        full.key_real[row, at - n:at] = dynamic.real_mask[0]
        full.real_count[row] = dynamic.real_count[0]
        for src, dst in zip(dynamic.layers, full.layers):
            dst.keys[row].zero_()
            dst.values[row].zero_()
            width = src.keys.shape[2]
            end = width if dst.merging else at  # ATM layers store compacted groups from slot 0
            dst.keys[row, :, end - width:end] = src.keys[0]
            dst.values[row, :, end - width:end] = src.values[0]
            for name, buf in dst.sums.items():
                buf[row] = getattr(src, name)[0]
            for name in ATM_STATE:
                buf = getattr(dst, name)
                if buf is not None:
                    buf[row] = getattr(src, name)[0]

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` over row `dst` (every buffer)."""
        if src == dst:
            return
        for buf in self._row_buffers():
            buf[dst] = buf[src]

    def shift(self, batch: int, by: int, position: int) -> None:
        """Move the plain-layer slots [0, position) of rows 0..batch-1 by `by` slots (the vacated ones
        are cleared and masked); the caller sets the new position `position + by`."""
        if by == 0 or batch == 0:
            return
        new = position + by
        if new < 0 or new > self.capacity:
            raise ValueError(f"cannot shift {position} slots by {by} in a cache of {self.capacity}")
        full = self.full
        slot_buffers = [(full.key_real[:batch], 1)]
        for layer in full.layers:
            if not layer.merging:
                slot_buffers += [(layer.keys[:batch], 2), (layer.values[:batch], 2)]
        for buf, dim in slot_buffers:
            if by > 0:
                kept = buf.narrow(dim, 0, position).clone()
                buf.narrow(dim, by, position).copy_(kept)
                buf.narrow(dim, 0, by).zero_()
            else:
                kept = buf.narrow(dim, -by, new).clone()
                buf.narrow(dim, 0, new).copy_(kept)
                buf.narrow(dim, new, -by).zero_()

    def _row_buffers(self) -> list[torch.Tensor]:
        bufs = [self.full.key_real, self.full.real_count]
        for layer in self.full.layers:
            bufs += list(layer.buffers().values())
        return bufs
