"""The model as one step function over explicit, fixed-capacity state — what `wiola export --to onnx` exports.

`OnnxStep(model)` is a `torch.nn.Module` whose forward takes `input_ids [B, T]`, `attention_mask [B, T]` (1 for
the real new tokens, 0 for padding) and the past state as plain tensors, and returns the logits `[B, T, V]` and
the new state, tensor for tensor (`state_spec` names and shapes them). T is any chunk length: the whole prompt
on empty state, then one token per step. Every slot buffer has the capacity L chosen by whoever allocates the
state (a dynamic axis of the exported graph), so nothing in the step has a data-dependent shape.

The state (per row b unless said otherwise):

* `position` `[1]`: slots used so far (pads included; the same for every row);
* `key_real` `[B, L]` bool: the slot holds a real token; `real_count` `[B]`: real tokens so far;
* per layer i: `{i}.keys` / `{i}.values` `[B, H_kv, L, d_h]` (plain layers: slot s holds token s; ATM layers:
  the first `{i}.lengths` slots hold the merged groups), `{i}.gsa_sum` `[B, d_h]` (GSA), `{i}.out_sum` `[B, D]`
  (GCLA, every layer but the last), and for ATM layers `{i}.lengths` `[B]`, `{i}.last_x` `[B, D]`,
  `{i}.last_real` / `{i}.last_taken` `[B]` bool (pairing the next token with the last one); with HLN norms
  `{i}.hln_in` / `{i}.hln_post` `[B, 1]` (and `{L-1}.hln_final`): running sums of token mean squares.

The step runs the model's own decoder stack (`WiolaModel._layers`, so every component computes with the
model's code); only the state it reads and writes is new: `_StepState` stands in for the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wiola.configuration_wiola import WiolaConfig
from wiola.modeling_wiola import StepInfo


@dataclass(frozen=True)
class StateTensor:
    """One state tensor: its name, dtype ("float", "bool" or "int64") and shape, whose entries are ints or
    the symbols "batch" and "capacity"."""

    name: str
    dtype: str
    shape: tuple

    def resolve(self, batch: int, capacity: int) -> tuple[int, ...]:
        return tuple({"batch": batch, "capacity": capacity}.get(s, s) for s in self.shape)


def state_spec(config: WiolaConfig) -> list[StateTensor]:
    """The state tensors of `config`'s model, in the order the step takes and returns them."""
    kv, dh, d = config.num_key_value_heads, config.head_dim, config.hidden_size
    merge = set(config.merge_layers) if config.atm_threshold < 1.0 else set()
    spec = [StateTensor("position", "int64", (1,)), StateTensor("key_real", "bool", ("batch", "capacity")),
            StateTensor("real_count", "int64", ("batch",))]
    for i in range(config.num_hidden_layers):
        spec += [StateTensor(f"{i}.keys", "float", ("batch", kv, "capacity", dh)), StateTensor(f"{i}.values", "float", ("batch", kv, "capacity", dh))]
        if config.attention_gate == "gsa":
            spec.append(StateTensor(f"{i}.gsa_sum", "float32", ("batch", dh)))
        if config.cross_layer_context == "gcla" and i < config.num_hidden_layers - 1:
            spec.append(StateTensor(f"{i}.out_sum", "float32", ("batch", d)))
        if i in merge:
            spec += [StateTensor(f"{i}.lengths", "int64", ("batch",)), StateTensor(f"{i}.last_x", "float", ("batch", d)),
                     StateTensor(f"{i}.last_real", "bool", ("batch",)), StateTensor(f"{i}.last_taken", "bool", ("batch",))]
        if config.norm == "hln":  # the running sums of token mean squares of the layer's norms (and the final one)
            spec += [StateTensor(f"{i}.hln_in", "float32", ("batch", 1)), StateTensor(f"{i}.hln_post", "float32", ("batch", 1))]
            if i == config.num_hidden_layers - 1:
                spec.append(StateTensor(f"{i}.hln_final", "float32", ("batch", 1)))
    return spec


def empty_state(config: WiolaConfig, batch: int, capacity: int, dtype: torch.dtype = torch.float32, device=None) -> list[torch.Tensor]:
    """Zeros for every state tensor: the state before the first token."""
    dtypes = {"float": dtype, "float32": torch.float32, "bool": torch.bool, "int64": torch.long}
    return [torch.zeros(s.resolve(batch, capacity), dtype=dtypes[s.dtype], device=device) for s in state_spec(config)]


class _LayerState:
    """One layer's state for the step; the attention code reads and replaces its attributes (a plain layer
    through `update` and `accumulate`, an ATM layer in `merging_wiola._fixed_chunk`)."""

    fixed = True  # merged_attention: fixed-capacity state, replaced functionally

    def __init__(self, slots: torch.Tensor, merging: bool, tensors: dict[str, torch.Tensor]):
        self.slots, self.merging = slots, merging
        for name, value in tensors.items():
            setattr(self, name, value)

    def accumulate(self, name: str, running: torch.Tensor) -> torch.Tensor:
        running = running + getattr(self, name)[:, None]
        setattr(self, name, running[:, -1])
        return running

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the chunk's keys/values `[B, H_kv, T, d_h]` at its slots; return the whole buffers."""
        index = self.slots[None, None, :, None].expand_as(key_states)
        self.keys = self.keys.scatter(2, index, key_states)
        self.values = self.values.scatter(2, index, value_states)
        return self.keys, self.values


class _StepState:
    """Stands in for the cache in `WiolaModel._layers`: a `layers` list of `_LayerState`."""

    def __init__(self, layers: list[_LayerState]):
        self.layers = layers


class OnnxStep(nn.Module):
    """`forward(input_ids, attention_mask, *state) -> (logits, *new_state)`; see the module docstring."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.spec = state_spec(model.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *state: torch.Tensor):
        config, inner = self.model.config, self.model.model
        named = dict(zip((s.name for s in self.spec), state))
        position, key_real, real_count = named["position"], named["key_real"], named["real_count"]
        b, t = input_ids.shape
        device = input_ids.device
        real = attention_mask.bool()
        cum_real = real_count[:, None] + real.long().cumsum(dim=1)
        position_ids = (cum_real - 1).clamp(min=0)
        slots = position + torch.arange(t, device=device)  # [T] the chunk's slots
        key_real = key_real.scatter(1, slots[None, :].expand(b, -1), real)
        every = torch.arange(key_real.shape[1], device=device)
        causal = every[None, None, :] <= slots[None, :, None]
        mask = ((causal & key_real[:, None, :]) | (every[None, None, :] == slots[None, :, None]))[:, None]
        step = StepInfo(real=real, cum_real=cum_real, count=cum_real.clamp(min=1)[..., None].to(torch.float32),
                        padded=True, mask=mask, is_causal=False)
        merge = set(config.merge_layers) if config.atm_threshold < 1.0 else set()
        layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"{i}."
            tensors = {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}
            layers.append(_LayerState(slots, i in merge, tensors))
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(position_ids, hidden.dtype)
        hidden = inner._layers(hidden, cos, sin, step, _StepState(layers), False)[0]
        logits = self.model.lm_head(hidden)
        new = {"position": position + t, "key_real": key_real, "real_count": cum_real[:, -1]}
        for i, layer in enumerate(layers):
            for s in self.spec:
                if s.name.startswith(f"{i}."):
                    new[s.name] = getattr(layer, s.name[len(f"{i}."):])
        return (logits, *(new[s.name] for s in self.spec))
