"""The model cache of one request: a preallocated ``DynamicCache`` storing KV at a chosen precision, and KV sizes.

Moving KV between a model cache and the prefix cache's pool is ``engine/kv_pool.py``'s job.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingKVLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new KV into a preallocated buffer instead of concatenating.

    ``DynamicLayer.update`` runs ``torch.cat`` at every step, copying the whole KV again: O(n) per
    token, a tenth or more of a decode step at 1k tokens of context on a CPU. Here a buffer sized
    for the whole request (prompt + max_new_tokens) takes each new token in place, and doubles in
    the rare case it is full. ``keys``/``values`` are views of its filled part; positions already
    written are never written again, so views taken of them (to insert into the prefix cache) stay
    valid. Outputs are bit-identical to ``DynamicLayer``.

    ``storage_dtype`` (default: the dtype of the first KV written) may be lower than the model's:
    bf16 KV for an fp32 model. New KV is rounded on writing, and attention gets the stored values
    back in the compute dtype, so the model attends over exactly what the prefix cache stores and
    a hit reproduces a miss token for token. ``keys``/``values`` stay views at the storage dtype.
    """

    def __init__(self, capacity: int = 0, storage_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.capacity = capacity
        self.storage_dtype = storage_dtype
        self._key_buffer: torch.Tensor | None = None  # [1, kv_heads, capacity, head_dim]
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._key_buffer is None or self._length + new > self._key_buffer.shape[-2]:
            self._grow(max(self.capacity, 2 * (self._length + new)), key_states, value_states)
        end = self._length + new
        self._key_buffer[:, :, self._length : end, :] = key_states
        self._value_buffer[:, :, self._length : end, :] = value_states
        self._length = end
        self.keys = self._key_buffer[:, :, :end, :]
        self.values = self._value_buffer[:, :, :end, :]
        # Stored lower (bf16 KV): attention reads the rounded values, in the compute dtype (a no-op otherwise).
        return self.keys.to(key_states.dtype), self.values.to(value_states.dtype)

    # The decode step of engine/fast_llama.py writes into the buffers itself: reserve, write, advance.

    @property
    def key_buffer(self) -> torch.Tensor:
        return self._key_buffer

    @property
    def value_buffer(self) -> torch.Tensor:
        return self._value_buffer

    def reserve(self, new: int) -> None:
        """Make room for ``new`` more tokens in the buffers (which must exist: after a prefill)."""
        assert self._key_buffer is not None, "reserve() before any update(): prefill first"
        if self._length + new > self._key_buffer.shape[-2]:
            self._grow(max(self.capacity, 2 * (self._length + new)), self._key_buffer, self._value_buffer)

    def advance(self, new: int) -> None:
        """Count ``new`` tokens written into the buffers at the next positions."""
        self._length += new
        self.keys = self._key_buffer[:, :, : self._length, :]
        self.values = self._value_buffer[:, :, : self._length, :]

    def allocate(self, kv_heads: int, head_dim: int, device: torch.device) -> None:
        """Make the zeroed buffers now, ``[1, kv_heads, capacity, head_dim]``, for a step that writes into them before any update()."""
        with torch.inference_mode(False):  # never inference tensors: see _grow
            shape = (1, kv_heads, max(self.capacity, 1), head_dim)
            self._hold(torch.zeros(shape, dtype=self.storage_dtype, device=device), torch.zeros(shape, dtype=self.storage_dtype, device=device), 0)

    @classmethod
    def holding(cls, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> "GrowingKVLayer":
        """A layer over existing buffers ``[1, kv_heads, capacity, head_dim]`` whose first ``length`` positions are filled (the decode step's start-up check)."""
        layer = cls(key_buffer.shape[-2], key_buffer.dtype)
        layer._hold(key_buffer, value_buffer, length)
        return layer

    def _hold(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Take ``key_buffer``/``value_buffer`` as this layer's buffers, their first ``length`` positions filled."""
        self._key_buffer, self._value_buffer, self.is_initialized = key_buffer, value_buffer, True
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self._length = 0
        self.advance(length)

    def rewind(self, length: int) -> None:
        """Drop every position from ``length`` on (a padded chunk's pads, see engine/prefill.py); the bytes stay until overwritten."""
        assert 0 <= length <= self._length, f"cannot rewind to {length}: {self._length} positions are filled"
        self._length = length
        self.keys = self._key_buffer[:, :, :length, :]
        self.values = self._value_buffer[:, :, :length, :]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._length = self.get_seq_length()

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None
        self._length = 0

    def _grow(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        def bigger(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            # Zeros: the compiled step attends over masked, unwritten positions (0 x NaN is NaN). Never an
            # inference tensor, whatever mode the caller runs in: the compiled step's graph is guarded on
            # how its inputs were made, and a prefill (inference mode) and a prefix-cache hit must not differ.
            with torch.inference_mode(False):
                buffer = like.new_zeros(like.shape[0], like.shape[1], capacity, like.shape[3], dtype=self.storage_dtype or like.dtype)
            if old is not None and self._length:
                buffer[:, :, : self._length, :] = old[:, :, : self._length, :]
            return buffer

        self._key_buffer = bigger(self._key_buffer, key_states)
        self._value_buffer = bigger(self._value_buffer, value_states)


def new_model_cache(config, capacity: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> DynamicCache:
    """An empty model cache whose layers preallocate ``capacity`` tokens and store KV in ``dtype``
    (None: the model's); plain layers, at the model's dtype, for sliding-window models. With ``device``
    and ``dtype`` the buffers are made now (the decode step's prefill writes into them), else at the first update."""
    cache = DynamicCache(config=config)
    if not _has_sliding(cache):
        cache.layers = [GrowingKVLayer(capacity, dtype) for _ in cache.layers]
        if device is not None and dtype is not None:
            _, kv_heads, head_dim = _kv_shape(config)
            for layer in cache.layers:
                layer.allocate(kv_heads, head_dim, device)
    return cache


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Theory: 2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    layers, kv_heads, head_dim = _kv_shape(config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model's text config."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or text.num_attention_heads, head_dim


def has_sliding_layers(config) -> bool:
    """Sliding-window layers keep only their last window of KV, so a stored prefix would be incomplete."""
    return _has_sliding(DynamicCache(config=config))


def _has_sliding(cache: DynamicCache) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in cache.layers)
