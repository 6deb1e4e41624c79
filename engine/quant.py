"""Weight formats: fp32, bf16, and weight-only int8 and int4 linears on torch's own CPU kernels.

Decoding reads every weight once per token, so on a CPU its speed is the bytes of the weights:
fp32 540 MB, bf16 270 MB, int8 ~170 MB, int4 ~90 MB for SmolLM2-135M. Prefill is the opposite:
many tokens per weight, bound by arithmetic, and fastest in fp32 GEMM. So int8 and int4 keep the
model in float32 for prefill (and for runs without a KV cache) and give only the one-token decode
step (``engine.fast_llama``) quantized copies of the decoder layers' linears and the ``lm_head``:
:class:`Int8Linear` or :class:`Int4Linear`, whose matmuls are ``torch.ops.aten._weight_int8pack_mm``
and ``_weight_int4pack_mm_for_cpu``. Both kernels take bf16 activations only (fp32 falls back to a
scalar loop, 40x slower); the step casts at each linear. The copies cost memory on top of the
fp32 model (~90 MB for int4). On other devices the same modules de-quantize on the fly (correct,
not fast).

Int4 is group-wise in Q4_1's own form: blocks of 32 input weights, ``w = q * scale + minimum``
with ``q`` in 0..15. For the bundled GGUF, whose linears are Q4_1, :func:`gguf_int4_blocks` takes
``q``, ``scale`` and ``minimum`` from the file's blocks: the 4-bit weights are the file's, not a
second rounding, and the float32 model that prefills holds exactly their de-quantized values (the
kernel keeps scales in bf16, a 0.3% relative error on them). Other weights are rounded like
llama.cpp's ``quantize_row_q4_1``.

Knows nothing about requests or caches; ``engine.loading`` finds the GGUF, ``engine.engine``
picks the format once at start-up.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from engine.loading import file_digest

WEIGHT_FORMATS = ("auto", "fp32", "bf16", "int8", "int4")
GROUP_SIZE = 32  # Q4_1's block: 32 input weights share a scale and a minimum
_INNER_K_TILES = 2  # the CPU int4 packing's tile; K must be a multiple of 16 * this


@dataclass(frozen=True)
class Int4Blocks:
    """4-bit weights in Q4_1's form: ``w[n, k] = q[n, k] * scale[n, k // 32] + minimum[n, k // 32]``.

    Shapes: ``q`` ``[N, K]`` uint8 in 0..15; ``scale`` and ``minimum`` ``[N, K // group]`` float32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    group: int = GROUP_SIZE

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = GROUP_SIZE) -> "Int4Blocks":
        """Round ``weight`` ``[N, K]`` to 4 bits per group, min to max over 15 steps (llama.cpp's Q4_1)."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group, group)
        minimum, maximum = w.amin(-1), w.amax(-1)
        scale = (maximum - minimum) / 15
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = ((w - minimum[..., None]) * inverse[..., None]).round().clamp(0, 15).to(torch.uint8)
        return cls(q.reshape(n, k), scale, minimum, group)

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weights these blocks stand for (``d * q + m``, as llama.cpp and gguf-py compute it)."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.group, self.group).float()
        return (self.scale[..., None] * q + self.minimum[..., None]).reshape(n, k)

    @staticmethod
    def cat(parts: list["Int4Blocks"]) -> "Int4Blocks":
        """Blocks of several linears stacked along the output dimension (a fused QKV or gate/up)."""
        return Int4Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "minimum")), parts[0].group)


class Int4Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` in :class:`Int4Blocks`; bf16 in, bf16 out.

    On a CPU the weights are packed for ``_weight_int4pack_mm_for_cpu``, which computes
    ``w = (q - 8) * scale + zero``: so ``zero = minimum + 8 * scale``. ``scales_and_zeros``:
    ``[K // group, N, 2]`` bf16.
    """

    def __init__(self, blocks: Int4Blocks, bias: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.q.shape
        if self.in_features % (16 * _INNER_K_TILES) or self.in_features % blocks.group:
            raise ValueError(f"int4 needs input sizes divisible by {max(16 * _INNER_K_TILES, blocks.group)}, got {self.in_features}")
        self.group = blocks.group
        device = torch.device(device)
        zero = blocks.minimum + 8 * blocks.scale
        self.register_buffer("scales_and_zeros", torch.stack([blocks.scale, zero], -1).transpose(0, 1).contiguous().to(device, torch.bfloat16))
        self.cpu_kernel = device.type == "cpu"
        if self.cpu_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), _INNER_K_TILES)
        else:  # plain [N, K] uint8, de-quantized per call
            packed = blocks.q.to(device)
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, torch.bfloat16))

    @classmethod
    def stacked(cls, linears: list["Int4Linear"]) -> "Int4Linear":
        """One module for several (bias-free) ones, outputs side by side; on a CPU every part must have rows in multiples of 64."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.group, fused.cpu_kernel = linears[0].in_features, linears[0].group, linears[0].cpu_kernel
        fused.out_features = sum(l.out_features for l in linears)
        fused.register_buffer("scales_and_zeros", torch.cat([l.scales_and_zeros for l in linears], dim=1))
        fused.register_buffer("packed", torch.cat([l.packed for l in linears]))
        fused.register_buffer("bias", None)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, K]
        if self.cpu_kernel:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)
        else:
            y = F.linear(x, self._dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def _dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        q = self.packed.reshape(n, k // self.group, self.group).to(torch.bfloat16) - 8
        scale, zero = self.scales_and_zeros.transpose(0, 1).unbind(-1)  # [N, K // group] each
        return (q * scale[..., None] + zero[..., None]).reshape(n, k)


class Int8Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` rounded to int8 per output channel (symmetric); bf16 in, bf16 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(-1).clamp(min=1e-12) / 127  # [N]
        device = torch.device(device)
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(device, torch.int8))
        self.register_buffer("scales", scale.to(device, torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, torch.bfloat16))
        self.cpu_kernel = device.type == "cpu"

    @classmethod
    def stacked(cls, linears: list["Int8Linear"]) -> "Int8Linear":
        """One module for several (bias-free) ones, outputs side by side."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.cpu_kernel = linears[0].in_features, linears[0].cpu_kernel
        fused.out_features = sum(l.out_features for l in linears)
        fused.register_buffer("weight_int8", torch.cat([l.weight_int8 for l in linears]))
        fused.register_buffer("scales", torch.cat([l.scales for l in linears]))
        fused.register_buffer("bias", None)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.cpu_kernel:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        else:
            y = F.linear(x, self.weight_int8.to(torch.bfloat16)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)


def resolve_format(weights: str, dtype: str, device: torch.device) -> str:
    """The concrete format for the ``weights`` setting: ``auto`` is int4 on a CPU, else the ``dtype`` setting's float format.

    On a CPU int4 decodes faster than fp32 (a step reads ~95 MB, not 540; ``benchmark/decode_bench.py``
    measures both), prefills at fp32's speed (it prefills in fp32) and meets the quality bar (top-1 agreement with fp32 >= 90%,
    mean NLL within 2%; ``tests/test_quant.py``). It needs the Llama decode step: the engine falls
    back to fp32 where that step does not apply. An explicit ``dtype`` wins.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights != "auto":
        return weights
    if dtype != "auto":
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    if device.type == "cpu":
        return "int4"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


QUANTIZED = ("int8", "int4")  # formats whose decode step reads quantized copies; the model itself stays float32


def apply_format(model: nn.Module, fmt: str, gguf: Path | None = None, cache_dir: Path | None = None) -> nn.Module:
    """Give a loaded (float) transformers causal LM the weight format ``fmt`` in place and return it.

    ``fp32``/``bf16``/``fp16``: a plain cast. ``int8``/``int4``: the model in float32 (prefill), and
    ``model.decode_linears``: a quantized copy of every linear of the decoder layers, keyed by module
    name, for the decode step; the float32 weights become the copies' de-quantized values, so that
    prefill and decode compute with the same weights (for the GGUF's Q4_1 linears they already are). The ``lm_head`` is int8 in both (its own copy, the tied embedding
    stays float32: on SmolLM2 an int4 ``lm_head`` drops top-1 agreement with fp32 from 97% to 90%
    and raises the mean NLL by 2%). ``gguf``: the file the model came from, whose Q4_1 blocks int4 reuses
    (read once into ``cache_dir``, where given: parsing the file takes seconds).
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if fmt not in (*dtypes, *QUANTIZED):
        raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    if fmt in dtypes:
        return model.to(dtypes[fmt]).eval()
    model.to(torch.float32)
    device = next(model.parameters()).device
    from_file = gguf_int4_blocks(gguf, model.config, cache_dir) if fmt == "int4" and gguf is not None else {}
    copies: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not (name.startswith("model.layers.") or name == "lm_head"):
            continue
        if fmt == "int8" or name == "lm_head":  # an int4 lm_head costs 8 points of top-1 agreement; int8 keeps 97%
            copies[name] = copy = Int8Linear(module.weight, module.bias, device)
            weight = copy.weight_int8.float() * copy.scales.float()[:, None]
        else:
            blocks = from_file.get(name) or Int4Blocks.from_float(module.weight)
            copies[name], weight = Int4Linear(blocks, module.bias, device), blocks.dequantize()
        with torch.no_grad():  # prefill with the weights the step decodes with (the GGUF's Q4_1 linears already are)
            module.weight.copy_(weight)
    model.decode_linears = copies  # a plain dict, not submodules: transformers' forward never sees them
    model.quantization_format = fmt
    model.int4_from_gguf = bool(from_file)
    return model.eval()


def decode_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized copies :func:`apply_format` made for the decode step (empty for float formats)."""
    return getattr(model, "decode_linears", {})


def weight_format(model: nn.Module) -> str:
    """The format :func:`apply_format` gave ``model`` (or its parameters' dtype)."""
    fmt = getattr(model, "quantization_format", None)
    if fmt:
        return fmt
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")


def weight_bytes(module: nn.Module, skip: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of ``module``'s parameters and buffers, shared memory once, leaving out ``skip`` (a lookup table reads one row)."""
    skipped = {t.data_ptr() for t in skip}
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in list(module.parameters()) + list(module.buffers())
        if t.data_ptr() not in skipped
    )
    total, end = 0, 0
    for start, stop in spans:  # the union of the byte ranges: fused weights and their views count once
        total += max(stop - max(start, end), 0)
        end = max(end, stop)
    return total


# ---------------------------------------------------------------------- GGUF Q4_1 blocks

_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_int4_blocks(path: Path, config, cache_dir: Path | None = None) -> dict[str, Int4Blocks]:
    """The Q4_1 linears of a Llama GGUF file as :class:`Int4Blocks`, keyed by transformers module name.

    A Q4_1 block is 20 bytes: ``d`` (f16), ``m`` (f16), then 16 bytes whose low nibbles are weights
    0-15 and high nibbles 16-31. llama.cpp's converter permutes the rows of Q and K for its rotary
    layout; the rows are put back as transformers does (whole rows move, blocks stay intact).
    Tensors of other types (the Q8_0 embedding) are left out: their modules are rounded from floats.
    With ``cache_dir`` the blocks are kept there (keyed by the file's SHA-256, as the converted model
    is, so every install of one file shares one copy) and read back on later starts: gguf-py parses
    the whole file's metadata in Python, seconds on a small CPU.
    """
    if cache_dir is not None:
        stem = path.stem.lower()
        cached = cache_dir / f"{stem}-{file_digest(path)[:16]}.int4-blocks.pt"
        for stale in cache_dir.glob(f"{glob.escape(stem)}-*-*.int4-blocks.pt"):  # keyed by size and time, before: one per install
            if re.fullmatch(rf"{re.escape(stem)}-\d+-\d+\.int4-blocks\.pt", stale.name):
                stale.unlink(missing_ok=True)
        if cached.exists():
            return {name: Int4Blocks(*parts) for name, parts in torch.load(cached, weights_only=True).items()}
        blocks = gguf_int4_blocks(path, config)
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = cached.with_suffix(f".{os.getpid()}.tmp")
        torch.save({name: (b.q, b.scale, b.minimum) for name, b in blocks.items()}, staging)
        os.replace(staging, cached)  # whole or not at all, also with two processes starting at once
        return blocks
    import gguf as gguf_py

    text = config.get_text_config(decoder=True)
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    out: dict[str, Int4Blocks] = {}
    for tensor in gguf_py.GGUFReader(str(path)).tensors:
        parts = tensor.name.split(".")  # blk.3.attn_q.weight
        if tensor.tensor_type != gguf_py.GGMLQuantizationType.Q4_1 or len(parts) != 4 or parts[2] not in _GGUF_LINEARS:
            continue
        raw = torch.from_numpy(tensor.data.copy())  # [N, K // 32 * 20] uint8
        n = raw.shape[0]
        blocks = raw.reshape(n, -1, 20)
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # [N, K // 32]
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        qs = blocks[..., 4:]  # [N, K // 32, 16]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)  # [N, K]
        if parts[2] in ("attn_q", "attn_k"):
            rows = _unpermute_rows(n, heads if parts[2] == "attn_q" else kv_heads)
            q, d, m = q[rows], d[rows], m[rows]
        out[f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}"] = Int4Blocks(q.contiguous(), d.contiguous(), m.contiguous())
    return out


def _unpermute_rows(n: int, heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's rotary permutation (transformers' ``_reverse_permute_weights``)."""
    rows = torch.arange(n).reshape(heads, n // heads // 2, 2)
    return rows.transpose(1, 2).reshape(n)
