"""Attention of a decode batch: every request over its own KV, behind one op the compiler does not look into.

A batched decode step (``engine.fast_llama.FastDecoder.decode_batch``) computes the linears of
all its requests at once, one read of the weights for all of them, but each request attends over
its own KV: its own buffers, its own length. This module is that attention, as the custom op
``kvci::decode_attention(q, k, v, layer)``. Its implementation loops over the batch's rows and,
for row ``b``, writes the new K and V at the request's position and calls
``scaled_dot_product_attention`` on views of exactly its filled positions: the same call, on the
same shapes and the same bits, whether the request is alone or beside seven others. That is what
makes a request's attention batch-invariant by construction (the linears' half is checked at
start-up: ``FastDecoder.rows_invariant``).

The requests' buffers do not go through the graph: the op reads them from the *decode context*
that ``decode_batch`` sets around each step (:func:`decode_context`), as vLLM's attention op reads
its forward context (``vllm/forward_context.py``). So ``torch.compile`` sees one opaque call per
layer taking ``[B, H, 1, Dh]`` tensors with ``B`` dynamic, and one graph serves every batch size and
every mix of lengths; the op's fake implementation tells it the output's shape.

Knows nothing about requests, sampling or the prefix cache.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.nn import functional as F


@dataclass
class DecodeContext:
    """The KV of one decode step: per layer, per request, the ``[1, kv_heads, capacity, head_dim]`` buffers, and each request's position."""

    keys: list[list[torch.Tensor]]  # [layer][request]
    values: list[list[torch.Tensor]]
    positions: list[int]  # where each request's new token goes; it then attends over [0, position]
    scale: float
    gqa: bool


_local = threading.local()


@contextmanager
def decode_context(context: DecodeContext) -> Iterator[None]:
    """Make ``context`` the KV the op reads on this thread while one step runs."""
    _local.context = context
    try:
        yield
    finally:
        _local.context = None


@torch.library.custom_op("kvci::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """q ``[B, H, 1, Dh]``, k and v ``[B, KVH, 1, Dh]`` of one layer: write each request's k and v at its position, attend over its own filled KV.

    Returns ``[B, H, 1, Dh]`` in q's dtype. Attention computes in the wider of q's and the KV's dtypes
    (float32 for the int4/int8 steps, whose linears return bf16, as the float32 prefill does).
    """
    context: DecodeContext = _local.context
    assert context is not None and len(context.positions) == q.shape[0], "decode_attention runs inside decode_context(), one request per row"
    out = torch.empty_like(q)
    for b, position in enumerate(context.positions):
        k_buffer, v_buffer = context.keys[layer][b], context.values[layer][b]
        k_buffer[:, :, position : position + 1].copy_(k[b : b + 1])
        v_buffer[:, :, position : position + 1].copy_(v[b : b + 1])
        dtype = torch.promote_types(q.dtype, k_buffer.dtype)
        end = position + 1
        attn = F.scaled_dot_product_attention(
            q[b : b + 1].to(dtype), k_buffer[:, :, :end].to(dtype), v_buffer[:, :, :end].to(dtype), scale=context.scale, enable_gqa=context.gqa
        )
        out[b : b + 1] = attn.to(q.dtype)
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)
