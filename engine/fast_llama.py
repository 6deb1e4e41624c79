"""A hand-written Llama decode step, gpt-fast style: one token through the model, nothing else.

transformers stays the loader, the tokenizer, the prefill and the fallback; this module only
replaces the one-token decode step, the part that runs once per generated token and is bound by
reading the weights, and, where its rows are invariant, the prefill (:meth:`FastDecoder.step_rows`:
each prompt token a row of the step, as each new token is; ``engine/prefill.py``). It is built from a loaded ``LlamaForCausalLM`` (any weight format of
``engine.quant``) and shares its weights, except that the int8 and int4 formats give it their
quantized copies of the linears (``quant.decode_linears``) while the float32 model stays the fallback;
the projections of each layer are fused (Q, K and V in one matmul, gate and up in another) where
the format allows it. The same code runs several tokens at once (:meth:`FastDecoder.hidden`), which
the quality measure uses to score the decode path on a whole text in one pass.

KV stays where the prefill put it: the per-layer buffers of the request's model cache
(``engine.kv.GrowingKVLayer``, ``[1, kv_heads, capacity, head_dim]``, one K and one V buffer per
layer). The step writes the new token's K and V with ``index_copy_`` at its position and attends
over views of the filled part only, unmasked: the length of attention's reductions is the
position's, whatever the buffer's capacity (a request with another ``max_new_tokens``), so a token's
logits are a function of the tokens before it alone (the exactness contract, ``engine/prefill.py``).
The compiled step takes the same views, their length marked dynamic (``engine.compiled``). Attention
computes in the wider of the query's and the KV's dtypes: float32 for the int4/int8 steps, whose
linears return bf16, as the float32 prefill does. The prefix cache stores this step's KV only where
the engine prefills through it too (else replies are prefilled again before they are stored).

Knows nothing about requests, sampling or the prefix cache (``engine.engine`` calls
:meth:`FastDecoder.decode_one_token`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from engine.decode_attention import DecodeContext, decode_attention, decode_context
from engine.kv import GrowingKVLayer
from engine.quant import Int4Linear, Int8Linear, decode_linears, weight_bytes


def supports(model) -> bool:
    """The step covers plain Llama-family models: RMSNorm, SiLU MLP, rotary embeddings, no biases."""
    config = model.config
    return (
        getattr(config, "model_type", "") == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
    )


class FastDecoder(nn.Module):
    """One decode step of a Llama model: ``decode_one_token(token, model_cache) -> logits [vocab]`` (float32)."""

    def __init__(self, model) -> None:
        super().__init__()
        config, inner = model.config, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        quantized = decode_linears(model)  # int8/int4: the step's own copies; float formats: the model's linears

        def linear(name: str) -> nn.Module:
            return quantized[name] if name in quantized else model.get_submodule(name)

        self.embed = inner.embed_tokens
        self.norm_weight = inner.norm.weight
        self.lm_head = linear("lm_head")
        self.layers = nn.ModuleList(_Layer(layer, f"model.layers.{i}", linear, self.heads, self.kv_heads, self.head_dim) for i, layer in enumerate(inner.layers))
        # Rotary tables for every position: [max_positions, head_dim] each, as transformers computes them.
        positions = torch.arange(config.max_position_embeddings, device=self.norm_weight.device)[None]
        probe = torch.zeros(1, device=self.norm_weight.device, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        self.register_buffer("cos", cos[0].to(self.norm_weight.dtype), persistent=False)
        self.register_buffer("sin", sin[0].to(self.norm_weight.dtype), persistent=False)
        self.step = self.forward_batch  # what decode_batch calls: eager, or the compiled forward_batch (engine.compiled)
        self.invariant_rows = 1  # the largest call whose rows are each the bits of a row alone, every size up to it checked (check_rows_invariant)

    @torch.inference_mode()
    def decode_one_token(self, token: int, model_cache) -> torch.Tensor:
        """Feed ``token`` at the model cache's next position; return the logits after it, float32 ``[vocab]``."""
        return self.decode_batch([token], [model_cache])[0]

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], model_caches: list, step=None) -> torch.Tensor:
        """One decode step for several requests: ``tokens[b]`` at ``model_caches[b]``'s next position. Logits float32 ``[B, vocab]``."""
        return self.step_rows([[t] for t in tokens], model_caches, step)

    @torch.inference_mode()
    def step_rows(self, tokens: list[list[int]], model_caches: list, step=None) -> torch.Tensor:
        """One call of the step for several requests, each feeding ``tokens[r]`` (one or more) at ``model_caches[r]``'s next
        positions; the logits after each request's last token, float32 ``[R, vocab]``.

        Every token is a row of the step, as one decode token is: the linears run once for all rows (one
        read of the weights) and each row attends over its own request's KV up to its own position
        (``engine.decode_attention``; a request's rows are written and attended in order, so each sees
        the rows before it). Row ``b`` is bit for bit what it computes alone: the attention is the same
        call either way, and the rest of the step is checked row-invariant at start-up
        (:meth:`check_rows_invariant`); where it is not (the float GEMMs), the rows run one at a time
        through the same step. So a prompt fed here, in any split, leaves the KV that decoding it token by
        token leaves. ``step``: another step than ``self.step`` (the compile's checks).
        """
        if sum(map(len, tokens)) > self.invariant_rows:
            return torch.cat([self._step_one_by_one(ts, cache, step) for ts, cache in zip(tokens, model_caches)])
        device = self.norm_weight.device
        layers = [cache.layers for cache in model_caches]
        positions, owners, last = [], [], []
        for r, (request, ts) in enumerate(zip(layers, tokens)):
            start = request[0].get_seq_length()
            positions += range(start, start + len(ts))
            owners += [r] * len(ts)
            last.append(len(positions) - 1)
            for layer in request:
                layer.reserve(len(ts))
        context = DecodeContext(
            keys=[[layers[r][i].key_buffer for r in owners] for i in range(len(self.layers))],
            values=[[layers[r][i].value_buffer for r in owners] for i in range(len(self.layers))],
            positions=positions, scale=self.layers[0].scale, gqa=self.heads != self.kv_heads,
        )
        tokens_t = torch.tensor([t for ts in tokens for t in ts], device=device)[:, None]  # [N, 1]
        pos_t = torch.tensor(positions, device=device)  # [N]
        last_t = torch.tensor(last, device=device)  # [R]
        with decode_context(context):
            logits = (step or self.step)(tokens_t, pos_t, last_t)
        for request, ts in zip(layers, tokens):
            for layer in request:
                layer.advance(len(ts))
        return logits.float()

    def _step_one_by_one(self, tokens: list[int], model_cache, step) -> torch.Tensor:
        for token in tokens:
            logits = self.step_rows([[token]], [model_cache], step)
        return logits

    @torch.inference_mode()
    def decode_tokens(self, tokens: list[int], model_cache) -> torch.Tensor:
        """Feed ``tokens`` at the model cache's next positions; the last one's logits.

        One token is a decode step (:meth:`decode_batch`). Several at once (the quality measure's
        teacher forcing) run eagerly in one masked call.
        """
        if len(tokens) == 1:
            return self.decode_one_token(tokens[0], model_cache)
        layers: list[GrowingKVLayer] = model_cache.layers
        position = layers[0].get_seq_length()
        for layer in layers:
            layer.reserve(len(tokens))
        device = self.norm_weight.device
        tokens_t = torch.tensor([tokens], device=device)  # [1, T]
        pos_t = torch.arange(position, position + len(tokens), device=device)  # [T]
        end = position + len(tokens)
        keys, values = [layer.key_buffer[:, :, :end] for layer in layers], [layer.value_buffer[:, :, :end] for layer in layers]  # [1, KVH, end, Dh] views
        logits = self.forward(tokens_t, pos_t, keys, values)
        for layer in layers:
            layer.advance(len(tokens))
        return logits[0].float()

    @property
    def rows_invariant(self) -> bool:
        """Whether several rows may share a call at all (:attr:`invariant_rows` of 2 or more)."""
        return self.invariant_rows >= 2

    @torch.inference_mode()
    def check_rows_invariant(self, max_batch: int, kv_dtype: torch.dtype, step=None) -> int:
        """The largest call, up to ``max_batch`` rows, whose every size gives each row the bits it gets alone, through
        ``self.step``; sets :attr:`invariant_rows` (1: rows run one at a time).

        Runs the step on made-up requests (random KV of different lengths) alone and in every batch
        size from 2 to ``max_batch`` (the engine asks for its decode batch or its prefill chunk, whichever
        is larger), and compares the logits with ``torch.equal``, stopping at the first size that
        differs. torch's int4 and int8 CPU kernels pass every size on the hosts measured
        (benchmark/README.md); the float GEMMs fail at 2 (their blocking depends on the number of rows).
        """
        self.invariant_rows = 1
        if max_batch < 2:
            return 1
        generator = torch.Generator().manual_seed(0)
        lengths = [5 + 11 * b for b in range(max_batch)]
        tokens = torch.randint(self.embed.num_embeddings, (max_batch,), generator=generator).tolist()
        start = [self.new_kv(length + 1, kv_dtype) for length in lengths]
        for keys, values in start:
            for buffer in (*keys, *values):
                buffer.copy_(torch.randn(buffer.shape, generator=generator).to(buffer.dtype))

        def run(rows: list[int]) -> torch.Tensor:  # fresh copies of the made-up requests ``rows``, one step for all of them
            caches = [SimpleNamespace(layers=[GrowingKVLayer.holding(k.clone(), v.clone(), lengths[b]) for k, v in zip(*start[b])]) for b in rows]
            return self.decode_batch([tokens[b] for b in rows], caches, step)

        self.invariant_rows = max_batch  # so that decode_batch runs each size through the step in one call
        alone = torch.cat([run([b]) for b in range(max_batch)])
        checked = 1
        for size in range(2, max_batch + 1):
            if not torch.equal(run(list(range(size)))[:size], alone[:size]):
                break
            checked = size
        if checked >= 2 and not torch.equal(run([checked - 1, 0])[0], alone[checked - 1]):  # another neighbour, another place
            checked = 1
        self.invariant_rows = checked
        return checked

    def new_kv(self, capacity: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed K and V buffers for every layer, ``[1, kv_heads, capacity, head_dim]``, made as a request's are
        (``engine.kv``: never inference tensors, which the compiled graph's guards would tell apart)."""
        shape = (1, self.kv_heads, capacity, self.head_dim)
        with torch.inference_mode(False):
            return ([torch.zeros(shape, dtype=dtype, device=self.norm_weight.device) for _ in self.layers],
                    [torch.zeros(shape, dtype=dtype, device=self.norm_weight.device) for _ in self.layers])

    def bytes_per_step(self) -> int:
        """Bytes of weights one step reads: everything but the embedding table and the rotary tables (a row of each)."""
        lookups = (self.cos, self.sin) + (() if self.lm_head_is_embedding else (self.embed.weight,))
        return weight_bytes(self, skip=lookups)

    @property
    def lm_head_is_embedding(self) -> bool:
        return getattr(self.lm_head, "weight", None) is self.embed.weight

    def forward_batch(self, tokens: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The step: tokens ``[N, 1]`` at positions ``pos`` ``[N]``, each row attending over its own request's KV
        (``engine.decode_attention``, set up by :meth:`step_rows`). Returns the logits of rows ``last`` ``[R]``: ``[R, vocab]``."""
        x = self.embed(tokens)  # [N, 1, D]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [N, 1, 1, Dh]: one position per row
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, lambda q, k, v, i=i: decode_attention(q, k, v, i), self.eps)
        return self.lm_head(_rms_norm(x[:, -1].index_select(0, last), self.norm_weight, self.eps))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]) -> torch.Tensor:
        """tokens: [1, T]; pos: [T]; k_buffers/v_buffers: per layer [1, kv_heads, S, head_dim], ending at the last token's position. Returns its logits [1, vocab]."""
        return self.lm_head(self.hidden(tokens, pos, k_buffers, v_buffers)[:, -1])

    def hidden(self, tokens: torch.Tensor, pos: torch.Tensor, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]) -> torch.Tensor:
        """The final normed hidden states ``[1, T, D]`` of one request's ``tokens`` at positions ``pos``, their KV written into the buffers, under a causal mask."""
        x = self.embed(tokens)  # [1, T, D]
        cos, sin = self.cos[pos], self.sin[pos]  # [T, head_dim]
        mask = (torch.arange(k_buffers[0].shape[2], device=pos.device) <= pos[:, None]).view(1, 1, pos.shape[0], -1)  # [1, 1, T, S]: causal
        for layer, k_buffer, v_buffer in zip(self.layers, k_buffers, v_buffers):
            x = layer(x, cos, sin, lambda q, k, v, kb=k_buffer, vb=v_buffer, s=layer.scale: _masked_attention(q, k, v, kb, vb, pos, mask, s), self.eps)
        return _rms_norm(x, self.norm_weight, self.eps)


class _Layer(nn.Module):
    def __init__(self, layer, prefix: str, linear, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.attn_norm, self.ffn_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.wqkv = fuse_linears([linear(f"{prefix}.self_attn.{p}_proj") for p in "qkv"])
        self.wo = linear(f"{prefix}.self_attn.o_proj")
        self.w13 = fuse_linears([linear(f"{prefix}.mlp.gate_proj"), linear(f"{prefix}.mlp.up_proj")])
        self.w2 = linear(f"{prefix}.mlp.down_proj")
        self.scale = layer.self_attn.scaling

    def forward(self, x, cos, sin, attend, eps: float) -> torch.Tensor:
        """x ``[B, T, D]``; ``attend(q, k, v)`` writes k and v into the KV and returns the attention ``[B, H, T, Dh]``."""
        b, t = x.shape[0], x.shape[1]
        h = _rms_norm(x, self.attn_norm, eps)
        q, k, v = self.wqkv(h).split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = _rope(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, Dh]
        k = _rope(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, KVH, T, Dh]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        attn = attend(q, k, v)
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        gate, up = self.w13(_rms_norm(x, self.ffn_norm, eps)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def _masked_attention(q, k, v, k_buffer, v_buffer, pos, mask, scale: float) -> torch.Tensor:
    """One request's tokens at ``pos``: K and V into its buffers, then attention over the buffers under ``mask``.

    In the wider dtype: bf16 KV under a float32 model is attended in float32, as the prefill does
    (engine/kv.py), and so is float32 KV under the int4/int8 linears' bf16 outputs (casting the query,
    not the whole buffer)."""
    k_buffer.index_copy_(2, pos, k.to(k_buffer.dtype))
    v_buffer.index_copy_(2, pos, v.to(v_buffer.dtype))
    dtype = torch.promote_types(q.dtype, k_buffer.dtype)
    attn = F.scaled_dot_product_attention(q.to(dtype), k_buffer.to(dtype), v_buffer.to(dtype), attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return attn.to(q.dtype)


# ---------------------------------------------------------------------- helpers


def fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """One module computing ``cat([l(x) for l in linears], -1)`` in one matmul where the format allows it."""
    first = linears[0]
    if all(type(l) is nn.Linear and l.bias is None for l in linears):
        fused = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=False, device=first.weight.device, dtype=first.weight.dtype)
        fused.weight = nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
        for l, part in zip(linears, fused.weight.split([l.out_features for l in linears])):
            l.weight = nn.Parameter(part, requires_grad=False)  # the originals become views: the weights exist once
        return fused
    if all(type(l) is Int8Linear and l.bias is None for l in linears):
        fused = Int8Linear.stacked(linears)
        sizes = [l.out_features for l in linears]
        for l, w, s in zip(linears, fused.weight_int8.split(sizes), fused.scales.split(sizes)):
            l.weight_int8, l.scales = w, s  # views, as above
        return fused
    # The CPU int4 packing interleaves rows in blocks of 64: stacking packed rows is exact only on that grid.
    if all(type(l) is Int4Linear and l.bias is None and (not l.cpu_kernel or l.out_features % 64 == 0) for l in linears):
        fused = Int4Linear.stacked(linears)
        for l, packed in zip(linears, fused.packed.split([l.out_features for l in linears])):
            l.packed = packed  # a view, as above (the scales, a fifth of the bytes, stay their own: the kernel wants them contiguous)
        return fused
    return _Concat(linears)


class _Concat(nn.Module):
    """Several linears, outputs concatenated: the unfused fallback of :func:`fuse_linears`."""

    def __init__(self, linears: list[nn.Module]) -> None:
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([l(x) for l in self.linears], dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in float32, scale in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, Dh]; cos/sin: [T, Dh] (one request) or [B, 1, 1, Dh] (a decode batch). transformers' rotate-half form."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
