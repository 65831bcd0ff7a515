"""One compressed attention layer: the factors, rotated and quantized, in the
exact tensors the kernels take.

Build path (``CompressedQKV.build``), from a JointSVD at rank r and beta:

1. W_d, W_u = factors(r, beta)                     (svd.py)
2. H2: a random orthogonal r x r, absorbed offline: W_d <- W_d H2, W_u <- H2^T W_u
3. H1 (quantized settings): x is rotated online by hadamard_quant with
   ±1 signs s, so W_d <- H_E^T diag(s) W_d offline (x W_d = (x s) H_E H_E^T (s W_d))
4. weights quantized per output channel (MSE clip search), activations and
   the latent per token at run time.

Storage is in the ``b``-operand layout of quant_gemm (one row per output
channel): ``wd`` [r, E] and ``wu`` [cols, r] (cols = E_q + 2 E_kv in the
"qkv" latent form, 2 E_kv in the "kv" form, which also stores ``wq``
[E_q, E]: W_q whole, rotated by H1 like W_d), int8 codes (in [-7, 7] for
4-bit weights) with fp32 scales, or fp32 values when weights are not
quantized. ``kernel_tensors()`` repacks them for the ops: INT4 GEMM operands
packed two per byte, W_uk / W_uv per kv head [H_kv, r, d] with [H_kv, d]
scales.

``project(x)`` is the simulation of what the kernels compute (the same
codes, bit for bit, and the same dequantization, in float64): the fidelity
numbers of the pipeline are those of the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import reference as R
from ..model.dims import LayerDims, LatentDims
from ..model.layer_tensors import QSVDLayerSpec
from .quant import QuantConfig, fake_quant_rows, quantize_weight_rows, random_orthogonal, random_signs
from .svd import JointSVD


@dataclass
class CompressedQKV:
    dims: LayerDims
    rank: int
    beta: float
    quant: QuantConfig
    seed: int
    signs: torch.Tensor | None  # [E] fp32 (H1), None when activations are not quantized
    wd: torch.Tensor  # [r, E]: int8 codes or fp32
    wd_scale: torch.Tensor | None  # [r]
    wu: torch.Tensor  # [cols, r]
    wu_scale: torch.Tensor | None  # [cols]
    bias: torch.Tensor | None  # [out] fp32 (all of q, k, v)
    form: str = "qkv"  # the latent form (svd.py): "qkv" or "kv"
    wq: torch.Tensor | None = None  # [E_q, E] ("kv" form): int8 codes or fp32
    wq_scale: torch.Tensor | None = None  # [E_q]
    # Partial RoPE: the rotary pairs, whose dims come first in each q and k
    # head (W_u's q and k rows, W_q's rows and their biases are stored in
    # that order: with_rope_pairs); None: full RoPE, the model's layout.
    rope_pairs: tuple[int, ...] | None = None
    # Dequantized float64 (W_d, W_u, W_q) per device, made on first use: the
    # stored tensors never change, and the simulation runs every forward.
    _dense: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def latent_dims(self) -> LatentDims:
        return LatentDims(self.dims, self.form)

    # ---------------------------------------------------------------- build
    @classmethod
    def build(cls, svd: JointSVD, rank: int, beta: float, quant: QuantConfig, seed: int,
              like: "CompressedQKV | None" = None) -> "CompressedQKV":
        """``like``: a layer built from the same svd, quant and seed (another
        beta), whose W_q codes are reused (they depend on neither beta nor rank)."""
        W_d, W_u = svd.factors(rank, beta)
        H2 = random_orthogonal(rank, seed)
        W_d, W_u = W_d @ H2, H2.T @ W_u
        E = svd.dims.hidden
        signs = None
        if quant.a_bits < 16:
            if not _hadamard_ok(E):
                raise ValueError(f"hidden size {E} has no supported Hadamard transform (H1)")
            signs = random_signs(E, seed + 1)
            W_d = R.hadamard_matrix(E).T @ (signs.double()[:, None] * W_d)
        wd, wu = W_d.T.contiguous(), W_u.T.contiguous()  # b layout
        wq = wq_scale = None
        reuse_q = like is not None and like.form == svd.form == "kv" and like.seed == seed and like.quant == quant
        if svd.form == "kv" and not reuse_q:  # W_q whole, reading x exactly as W_d does (H1 folded in)
            W_q = svd.W_q if signs is None else R.hadamard_matrix(E).T @ (signs.double()[:, None] * svd.W_q)
            wq = W_q.T.contiguous()
        if quant.w_bits < 16:
            wd, wd_scale = quantize_weight_rows(wd, quant.w_bits)
            wu, wu_scale = quantize_weight_rows(wu, quant.w_bits)
            if wq is not None:
                wq, wq_scale = quantize_weight_rows(wq, quant.w_bits)
        else:
            wd, wu = wd.float(), wu.float()
            wq = wq.float() if wq is not None else None
            wd_scale = wu_scale = None
        if reuse_q:
            wq, wq_scale = like.wq, like.wq_scale
        bias = svd.bias.float() if svd.bias is not None else None
        return cls(svd.dims, rank, float(beta), quant, seed, signs, wd, wd_scale, wu, wu_scale, bias, svd.form, wq,
                   wq_scale)

    # ------------------------------------------------------------ forward
    def dense_weights(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W_d^T [r, E], W_u^T [cols, r], W_q^T [E_q, E] or None) dequantized,
        float64, on ``device``."""
        key = str(torch.device(device) if device is not None else self.wd.device)
        if key not in self._dense:
            def deq(codes, scale):
                if codes is None:
                    return None
                w = codes.to(device=key, dtype=torch.float64)
                return w * scale.to(device=key, dtype=torch.float64)[:, None] if scale is not None else w
            self._dense[key] = (deq(self.wd, self.wd_scale), deq(self.wu, self.wu_scale),
                                deq(self.wq, self.wq_scale))
        return self._dense[key]

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernels read it: rotated by H1 and quantized per token
        when activations are quantized (dequantized, float64)."""
        q = self.quant
        if q.a_bits < 16:
            codes, scale = R.hadamard_quant_ref(x, q.a_bits, q.a_clip, self.signs)
            return R.dequantize_rows_ref(codes, scale, q.a_bits)
        return x.to(torch.float64)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """c = x W_d as the kernels compute it (float64 result of exact int products)."""
        return self.latent_from_input(self.layer_input(x))

    def latent_from_input(self, xh: torch.Tensor) -> torch.Tensor:
        """c from ``layer_input(x)``."""
        return xh @ self.dense_weights(xh.device)[0].T

    def quantized_latent(self, c: torch.Tensor) -> torch.Tensor:
        """The latent as the cache holds it (per-token quantized), float64."""
        return fake_quant_rows(c.to(torch.float32), self.quant.latent_bits, self.quant.latent_clip).to(torch.float64) \
            if self.quant.latent_bits < 16 else c

    def project_cat(self, x: torch.Tensor, xh: torch.Tensor | None = None, c: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """[q | k | v] for inputs x [..., E], float64. ``xh`` (layer_input(x))
        and ``c`` (the latent) may be passed when already computed."""
        _, W_u, W_q = self.dense_weights(x.device)
        xh = self.layer_input(x) if xh is None else xh
        c = self.latent_from_input(xh) if c is None else c
        y = self.quantized_latent(c) @ W_u.T
        if W_q is not None:  # "kv" form: q straight from x
            y = torch.cat([xh @ W_q.T, y], dim=-1)
        if self.bias is not None:
            y = y + self.bias.to(device=x.device, dtype=torch.float64)
        return y

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) in x's dtype."""
        y = self.project_cat(x).to(x.dtype)
        d = self.dims
        return y[..., : d.q_dim], y[..., d.q_dim : d.q_dim + d.kv_dim], y[..., d.q_dim + d.kv_dim :]

    # -------------------------------------------------------- partial RoPE
    def with_rope_pairs(self, pairs) -> "CompressedQKV":
        """The same layer with partial RoPE: only ``pairs`` (indices of the
        model's rotary pairs, pair j rotating head dims j and j + d/2) stay
        rotary, the other dims of q and k become position-free. The q and k
        head dims are reordered (reference.partial_rope_permutation: the
        pairs' dims first), which changes no score; rows are quantized per
        output channel, so permuting them with their scales is exact.
        Every pair: the layer itself (full RoPE)."""
        if self.rope_pairs is not None:
            raise ValueError("this layer already has partial RoPE; make it from the full-RoPE layer")
        d = self.dims
        pairs = tuple(int(j) for j in pairs)
        if sorted(pairs) == list(range(d.head_dim // 2)) and pairs == tuple(sorted(pairs)):
            return self
        perm = R.partial_rope_permutation(d.head_dim, pairs)

        def heads(n_heads: int, offset: int) -> torch.Tensor:  # row indices of n_heads heads at offset, permuted
            return (offset + torch.arange(n_heads)[:, None] * d.head_dim + perm[None, :]).reshape(-1)

        k0 = self.latent_dims.first_col  # W_u's rows: [q |] k | v
        rows = torch.arange(self.wu.shape[0])
        if self.form == "qkv":
            rows[: d.q_dim] = heads(d.num_heads, 0)
        rows[d.q_dim - k0 : d.q_dim - k0 + d.kv_dim] = heads(d.num_kv_heads, d.q_dim - k0)
        out_rows = torch.arange(d.out_dim)  # the bias: [q | k | v] always
        out_rows[: d.q_dim] = heads(d.num_heads, 0)
        out_rows[d.q_dim : d.q_dim + d.kv_dim] = heads(d.num_kv_heads, d.q_dim)
        q_rows = heads(d.num_heads, 0)

        def take(t, idx):
            return None if t is None else t[idx].contiguous()

        return CompressedQKV(self.dims, self.rank, self.beta, self.quant, self.seed, self.signs, self.wd, self.wd_scale,
                             take(self.wu, rows), take(self.wu_scale, rows), take(self.bias, out_rows), self.form,
                             take(self.wq, q_rows), take(self.wq_scale, q_rows), pairs)

    # ------------------------------------------------------------- packing
    def spec(self) -> QSVDLayerSpec:
        """The layer as the kernels run it (model.layer_tensors): quantized settings only."""
        q = self.quant
        if not (q.w_bits < 16 and q.a_bits < 16 and q.latent_bits < 16):
            raise ValueError(f"the kernels need quantized weights, activations and latent; this layer is {q.name}")
        return QSVDLayerSpec.of(self.dims, self.rank, q, self.form, self.rope_pairs)

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        """The operands of the qsvd ops (quantized settings only).

        - ``signs`` [E] fp32: hadamard_quant(x, a_bits, a_clip, signs)
        - ``wd`` [r, E] int8 or [r, E/2] uint8 + ``wd_scale`` [r]: quant_gemm b operand (x -> c)
        - "qkv" form: ``wuq`` [E_q, r] (or packed) + ``wuq_scale``: quant_gemm b operand (c -> q)
        - "kv" form: ``wq`` [E_q, E] (or packed) + ``wq_scale``: quant_gemm b operand (x -> q,
          on the same activation codes as wd)
        - ``wuk``, ``wuv`` [H_kv, r, d] int8 + ``wuk_scale``, ``wuv_scale`` [H_kv, d]:
          latent_attention / latent_reconstruct_kv weights
        - ``bq``, ``bk``, ``bv`` fp32 biases when the layer has them. A K bias
          adds the same q.b_k to every score and cancels in softmax; a V bias
          adds b_v to the output (softmax weights sum to 1).
        """
        spec = self.spec()  # raises for unquantized settings
        q, d = self.quant, self.dims
        pack = q.w_format.pack  # INT4: two codes per byte; INT8: the int8 codes themselves
        out = {"signs": self.signs, "wd": pack(self.wd), "wd_scale": self.wd_scale}
        if self.form == "qkv":
            out.update(wuq=pack(self.wu[: d.q_dim].contiguous()), wuq_scale=self.wu_scale[: d.q_dim].contiguous())
        else:
            out.update(wq=pack(self.wq), wq_scale=self.wq_scale)
        k0 = self.latent_dims.first_col  # W_u's rows: [q |] k | v
        for name, lo in (("wuk", d.q_dim - k0), ("wuv", d.q_dim - k0 + d.kv_dim)):
            w = self.wu[lo : lo + d.kv_dim]  # [E_kv, r]
            out[name] = w.reshape(d.num_kv_heads, d.head_dim, self.rank).transpose(1, 2).contiguous()
            out[name + "_scale"] = self.wu_scale[lo : lo + d.kv_dim].reshape(d.num_kv_heads, d.head_dim).contiguous()
        if self.bias is not None:
            out["bq"] = self.bias[: d.q_dim].contiguous()
            out["bk"] = self.bias[d.q_dim : d.q_dim + d.kv_dim].contiguous()
            out["bv"] = self.bias[d.q_dim + d.kv_dim :].contiguous()
        spec.check(out, "CompressedQKV.kernel_tensors")  # the one schema (model.layer_tensors)
        return out

    # --------------------------------------------------------- persistence
    TENSOR_FIELDS = ("signs", "wd", "wd_scale", "wu", "wu_scale", "bias", "wq", "wq_scale")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.TENSOR_FIELDS if getattr(self, f) is not None}

    def meta(self) -> dict:
        m = {"dims": self.dims.to_dict(), "rank": self.rank, "beta": self.beta, "quant": self.quant.to_dict(),
             "seed": self.seed, "form": self.form}
        if self.rope_pairs is not None:  # format version 3; absent: full RoPE
            m["rope_pairs"] = list(self.rope_pairs)
        return m

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor], where: str) -> "CompressedQKV":
        """Rebuild from meta() and tensors(), checking every shape and dtype."""
        try:
            dims = LayerDims(**meta["dims"])
            rank, quant = int(meta["rank"]), QuantConfig(**meta["quant"])
            beta, seed = float(meta["beta"]), int(meta["seed"])
            form = meta.get("form", "qkv")  # format version 1 knew only the joint QKV latent
            lat = LatentDims(dims, form)
            pairs = meta.get("rope_pairs")  # format version 3; absent: full RoPE
            if pairs is not None:
                pairs = tuple(int(j) for j in pairs)
                R.partial_rope_permutation(dims.head_dim, pairs)  # checks them
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed layer config ({e})") from None
        if not 1 <= rank <= lat.max_rank:
            raise ValueError(f"{where}: rank {rank} is outside [1, {lat.max_rank}] for the {form!r} latent form")
        E, out, cols = dims.hidden, dims.out_dim, lat.cols
        wdt = torch.int8 if quant.w_bits < 16 else torch.float32
        expect = {"wd": ((rank, E), wdt), "wu": ((cols, rank), wdt)}
        if quant.w_bits < 16:
            expect.update(wd_scale=((rank,), torch.float32), wu_scale=((cols,), torch.float32))
        if form == "kv":
            expect["wq"] = ((dims.q_dim, E), wdt)
            if quant.w_bits < 16:
                expect["wq_scale"] = ((dims.q_dim,), torch.float32)
        if quant.a_bits < 16:
            expect["signs"] = ((E,), torch.float32)
        for name, (shape, dtype) in expect.items():
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"{where}: tensor {name!r} is missing")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{where}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        bias = tensors.get("bias")
        if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != torch.float32):
            raise ValueError(f"{where}: tensor 'bias' is {tuple(bias.shape)} {bias.dtype}, expected ({out},) float32")
        extra = set(tensors) - set(expect) - {"bias"}
        if extra:
            raise ValueError(f"{where}: unexpected tensors {sorted(extra)}")
        return cls(dims, rank, beta, quant, seed, tensors.get("signs"), tensors["wd"], tensors.get("wd_scale"),
                   tensors["wu"], tensors.get("wu_scale"), bias, form, tensors.get("wq"), tensors.get("wq_scale"),
                   pairs)


def _hadamard_ok(E: int) -> bool:
    try:
        R.hadamard_factorize(E)
        return True
    except ValueError:
        return False
