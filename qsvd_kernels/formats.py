"""Code formats: the one place in Python that says what a bit width means in
memory. ``include/qsvd/formats.h`` is its C++ twin (same names).

A code of ``bits`` bits lies in the symmetric range [-qmax, qmax]
(-2^(bits-1) is never produced). INT8: one signed byte per code (int8
storage). INT4: two's-complement nibbles, element 2i in the low nibble of
byte i (uint8 storage), so a row of n codes takes n / 2 bytes.

    fmt = code_format(4)
    fmt.qmax, fmt.codes_per_byte, fmt.dtype      # 7, 2, torch.uint8
    fmt.row_bytes(64)                            # 32
    fmt.unpack(fmt.pack(codes)) == codes         # int8 codes in, int8 codes out

Adding a bit width is an entry in ``_FORMATS`` (and in formats.h) plus the
kernel instantiations.

The paged latent cache has two layouts (docs/ops.md, "The latent cache
layouts"; ``include/qsvd/latent_cache_layout.h`` is the C++ twin):
separate (``cache`` codes ``[num_blocks, block_size, row_bytes]`` plus
``cache_scale`` fp32 ``[num_blocks, block_size]``) and packed rows
(``cache_scale`` None; ``cache`` uint8 ``[num_blocks, block_size, row_bytes + 4]``,
each row its codes followed by its fp32 scale in native byte order)::

    packed = pack_latent_rows(cache, cache_scale)        # uint8 [..., row_bytes + 4]
    codes, scale = split_latent_rows(packed, bits, r)    # views into packed
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CODE_BITS",
    "CodeFormat",
    "code_format",
    "is_code_bits",
    "qmax_for_bits",
    "code_row_bytes",
    "packed_row_bytes",
    "pack_latent_rows",
    "split_latent_rows",
    "reconstruct_out_dtype",
]


@dataclass(frozen=True)
class CodeFormat:
    """How codes of one bit width are stored."""

    bits: int
    qmax: int  # codes lie in [-qmax, qmax]
    codes_per_byte: int
    dtype: torch.dtype  # torch dtype of the stored codes

    def row_bytes(self, n: int) -> int:
        """Bytes (= stored elements) that a row of ``n`` codes occupies."""
        if n % self.codes_per_byte:
            raise ValueError(f"a row of {self.bits}-bit codes needs a multiple of {self.codes_per_byte} codes, got {n}")
        return n // self.codes_per_byte

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """int8 codes [..., n] -> stored codes [..., row_bytes(n)] of ``dtype``."""
        if self.codes_per_byte == 1:
            return codes.to(self.dtype)  # no copy when codes already are int8
        if codes.shape[-1] % 2:
            raise ValueError("pack_int4 needs an even last dimension")
        c = codes.to(torch.int16)
        lo = c[..., 0::2] & 0xF
        hi = c[..., 1::2] & 0xF
        return (lo | (hi << 4)).to(torch.uint8)

    def unpack(self, stored: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Stored codes [..., row_bytes(n)] -> int8 codes [..., n] (``n``, when
        given, is checked against the stored row)."""
        if n is not None and stored.shape[-1] != self.row_bytes(n):
            raise ValueError(f"{n} {self.bits}-bit codes take {self.row_bytes(n)} bytes per row, "
                             f"the stored rows have {stored.shape[-1]}")
        if self.codes_per_byte == 1:
            return stored.to(torch.int8)
        p = stored.to(torch.int16)
        lo = p & 0xF
        hi = (p >> 4) & 0xF
        lo = torch.where(lo >= 8, lo - 16, lo)
        hi = torch.where(hi >= 8, hi - 16, hi)
        return torch.stack((lo, hi), dim=-1).reshape(*stored.shape[:-1], stored.shape[-1] * 2).to(torch.int8)


_FORMATS = {
    4: CodeFormat(bits=4, qmax=7, codes_per_byte=2, dtype=torch.uint8),
    8: CodeFormat(bits=8, qmax=127, codes_per_byte=1, dtype=torch.int8),
}
CODE_BITS = tuple(sorted(_FORMATS))


def is_code_bits(bits: int) -> bool:
    return bits in CODE_BITS


def code_format(bits: int) -> CodeFormat:
    """The format of ``bits``-bit codes; ValueError for an unsupported width."""
    if not is_code_bits(bits):
        raise ValueError(f"bits must be {' or '.join(map(str, CODE_BITS))}, got {bits}")
    return _FORMATS[bits]


def qmax_for_bits(bits: int) -> int:
    """Symmetric code range [-qmax, qmax]."""
    return code_format(bits).qmax


def code_row_bytes(bits: int, n: int) -> int:
    """Bytes that a row of ``n`` codes of ``bits`` bits occupies."""
    return code_format(bits).row_bytes(n)


LATENT_SCALE_BYTES = 4  # one fp32 scale per packed row


def packed_row_bytes(bits: int, r: int) -> int:
    """Bytes of one packed latent-cache row: ``code_row_bytes(bits, r)`` code
    bytes, then the fp32 scale (4 bytes). The kernels require the code bytes
    to be a multiple of 4 (an aligned scale)."""
    return code_row_bytes(bits, r) + LATENT_SCALE_BYTES


def pack_latent_rows(codes_stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored codes ``[..., row_bytes]`` (int8, or uint8 INT4 nibbles) and
    their fp32 scales ``[...]`` -> packed rows, a new contiguous uint8 tensor
    ``[..., row_bytes + 4]``: each row its code bytes, then its scale's bytes
    (native byte order)."""
    if codes_stored.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"codes must be int8 or uint8 (stored codes), got {codes_stored.dtype}")
    if scale.shape != codes_stored.shape[:-1]:
        raise ValueError(f"scale must have shape {tuple(codes_stored.shape[:-1])} (one per row of codes), "
                         f"got {tuple(scale.shape)}")
    code_bytes = codes_stored.view(torch.uint8)
    scale_bytes = scale.to(torch.float32).contiguous().unsqueeze(-1).view(torch.uint8)  # [..., 4]
    return torch.cat((code_bytes, scale_bytes), dim=-1).contiguous()


def split_latent_rows(packed: torch.Tensor, bits: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows uint8 ``[..., row_bytes + 4]`` -> ``(codes_stored, scale)``:
    the stored codes ``[..., row_bytes]`` in the dtype of ``bits`` (int8, or
    uint8 INT4 nibbles) and the fp32 scales ``[...]``. Both are views into
    ``packed`` (writes through them land in it) when the scales are 4-byte
    aligned (``row_bytes % 4 == 0``, ``packed`` with unit last stride and an
    aligned start), copies otherwise."""
    fmt = code_format(bits)
    row_bytes = fmt.row_bytes(r)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed latent rows must be uint8, got {packed.dtype}")
    if packed.dim() < 1 or packed.shape[-1] != row_bytes + LATENT_SCALE_BYTES:
        raise ValueError(f"packed rows of r = {r} {bits}-bit codes have {row_bytes + LATENT_SCALE_BYTES} bytes "
                         f"({row_bytes} code bytes + a 4-byte scale), got shape {tuple(packed.shape)}")
    codes = packed[..., :row_bytes]
    codes = codes.view(fmt.dtype) if fmt.dtype != torch.uint8 else codes
    raw = packed[..., row_bytes:]
    try:
        scale = raw.view(torch.float32).squeeze(-1)
    except RuntimeError:  # unaligned rows: no float view exists
        scale = raw.contiguous().view(torch.float32).squeeze(-1)
    return codes, scale


def reconstruct_out_dtype(w_dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> torch.dtype:
    """The output dtype of latent_reconstruct_kv: ``out_dtype`` when given,
    else float16 for int8 (quantized) weights and the weights' dtype otherwise
    (``reconstruct_out_dtype`` in csrc/checks.cpp)."""
    if out_dtype is not None:
        return out_dtype
    return torch.float16 if w_dtype == torch.int8 else w_dtype
