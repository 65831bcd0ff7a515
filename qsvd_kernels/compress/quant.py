"""Quantization settings and the weight / activation quantizers of the pipeline.

Every rule is the op contract's (reference.py): symmetric, per row, round half
to even, codes in [-qmax, qmax]. Weights are quantized per output channel
(one row of the ``b`` operand of quant_gemm, i.e. one column of W) with an
MSE search over the clipping ratio; activations and the latent per token
with a fixed clip ratio. Bits 16 means "not quantized".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .. import reference as R
from ..formats import CODE_BITS, CodeFormat, code_format, is_code_bits

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths (4, 8, or 16 = off) and clip ratios of one setting.

    W8A8: QuantConfig(8, 8, 8); W8A4: QuantConfig(8, 4, 4); W4A4: QuantConfig(4, 4, 4).
    The latent shares the activations' bit width in the paper's settings.
    """

    w_bits: int = 16
    a_bits: int = 16
    latent_bits: int = 16
    a_clip: float = 1.0
    latent_clip: float = 0.9

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "latent_bits"):
            bits = getattr(self, name)
            if not (bits == 16 or is_code_bits(bits)):
                raise ValueError(f"{name} must be {', '.join(map(str, CODE_BITS))} or 16, got {bits}")
        for name in ("a_clip", "latent_clip"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @property
    def quantized(self) -> bool:
        return min(self.w_bits, self.a_bits, self.latent_bits) < 16

    # The code formats (formats.py) of the quantized parts; ValueError for 16 bits.
    @property
    def w_format(self) -> CodeFormat:
        return code_format(self.w_bits)

    @property
    def a_format(self) -> CodeFormat:
        return code_format(self.a_bits)

    @property
    def latent_format(self) -> CodeFormat:
        return code_format(self.latent_bits)

    @property
    def name(self) -> str:
        if not self.quantized:
            return "fp"
        return f"W{self.w_bits}A{self.a_bits}" + ("" if self.latent_bits == self.a_bits else f"L{self.latent_bits}")

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def parse(name: str) -> "QuantConfig":
        """'fp', 'W8A8', 'W8A4', 'W4A4' (latent bits = activation bits), or
        with the latent's own width, 'W8A8L4' (the inverse of ``name``)."""
        key = name.strip().upper()
        if key in ("FP", "FP16", "NONE"):
            return QuantConfig()
        import re

        m = re.fullmatch(r"W(4|8|16)A(4|8|16)(?:L(4|8|16))?", key)
        if not m:
            raise ValueError(f"unknown quantization setting {name!r}: use fp, W8A8, W8A4, W4A4, or one with the "
                             "latent's width, e.g. W8A8L4")
        w, a = int(m.group(1)), int(m.group(2))
        return QuantConfig(w, a, int(m.group(3)) if m.group(3) else a)


def quantize_weight_rows(w: torch.Tensor, bits: int, clip_grid=CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of ``w`` [N, K] with the clip ratio per
    row chosen from clip_grid to minimise the row's squared error.

    Returns int8 codes [N, K] (unpacked; in [-7, 7] for 4 bits) and fp32 scales [N].
    """
    w = w.to(torch.float32)
    best_err = torch.full((w.shape[0],), float("inf"), dtype=torch.float64)
    best_codes = torch.zeros(w.shape, dtype=torch.int8)
    best_scale = torch.zeros(w.shape[0], dtype=torch.float32)
    for clip in clip_grid:
        codes, scale = R.quantize_rows_ref(w, bits, clip)
        err = ((codes.double() * scale.double()[:, None] - w.double()) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes[better] = codes[better]
        best_scale[better] = scale[better]
    return best_codes, best_scale


def fake_quant_rows(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Quantize-dequantize per row (fp32 in, fp32 out); bits 16 is identity."""
    if bits >= 16:
        return x.to(torch.float32)
    codes, scale = R.quantize_rows_ref(x.to(torch.float32), bits, clip)
    return codes.to(torch.float32) * scale[..., None]


def random_signs(n: int, seed: int) -> torch.Tensor:
    """+-1 fp32 [n] (the randomised Hadamard's diagonal, H1)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float32)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal [n, n] float64 (QR of a Gaussian, signs fixed): H2."""
    g = torch.Generator().manual_seed(seed)
    Q, Rm = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(Rm))[None, :]
