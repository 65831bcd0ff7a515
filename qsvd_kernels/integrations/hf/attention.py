"""The QSVD decoder attention block and the hook on the decoder stack that
plans each step in the latent cache: Hugging Face's adapter over the
engine-neutral step (integrations/core.py). The cache plans each step once
(its rows, slots, positions and sequences: ``core.StepMetadata``); every
layer's block records the model's rotary tables and runs the core on it.
K and V are never stored.

Never silent: a block that finds no QSVDLatentCache for its step raises; it
does not attend to only the current call.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..core import refuse_k_bias
from .cache import QSVDLatentCache

try:
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover
    Cache = ()

# Keywords transformers has used for the cache argument of attention blocks
# and decoder stacks ("cache" from 5.2x, "past_key_values" before). The block
# finds the cache by type among whatever the installed version passes; this
# list only names the argument when the stack's signature is read.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


class DecoderStack:
    """The decoder stack of a model to which apply_qsvd was applied (the
    module holding the decoder layers, e.g. LlamaModel). Its forward
    pre-hook reads the model's 2D attention mask, position ids and cache
    argument, makes or checks the QSVDLatentCache, and plans the step; the
    post-hook commits it."""

    def __init__(self, module: nn.Module, projectors: list, families: list):
        params = inspect.signature(module.forward).parameters
        names = [k for k in CACHE_KEYWORDS if k in params]
        if not names:
            raise NotImplementedError(
                f"{type(module).__name__}.forward takes none of {CACHE_KEYWORDS}: this transformers version passes "
                "the KV cache in a way qsvd does not know, so the latent cache cannot be attached")
        self.cache_param = names[0]
        self.var_kw = next((k for k, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self.projectors = projectors
        self.families = families
        self.config = getattr(module, "config", None)
        self.current: QSVDLatentCache | None = None

    def _named(self, module, args, kwargs) -> dict:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return dict(kwargs)
        named = dict(bound.arguments)
        if self.var_kw is not None:
            named.update(named.pop(self.var_kw, {}))
        return named

    def pre_hook(self, module, args, kwargs):
        if module.training and getattr(module, "gradient_checkpointing", False):
            raise NotImplementedError("gradient checkpointing recomputes the decoder blocks in backward, which "
                                      "would append their latents to the cache twice; the QSVD decoder does not "
                                      "support it (disable it, or train the uncompressed model)")
        named = self._named(module, args, kwargs)
        found_key = next((k for k, v in named.items() if isinstance(v, Cache)), None)
        found = named.pop(found_key) if found_key is not None else None
        for k in CACHE_KEYWORDS:
            if k in named and named[k] is None:
                del named[k]
        use_cache = named.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True))
        passed = isinstance(found, QSVDLatentCache)
        if passed:
            if found.stack is not self:
                raise ValueError("this QSVDLatentCache was made for another model")
            cache = found
        elif found is not None and found.get_seq_length() > 0:
            raise TypeError(f"got a {type(found).__name__} holding {found.get_seq_length()} tokens: a QSVD-compressed "
                            "model caches only the latent, so generation needs a QSVDLatentCache(model) (or "
                            "qsvd_kernels.integrations.hf.generate, or no cache at all: one is made)")
        else:
            cache = QSVDLatentCache(self)  # a fresh forward: returned in the output when use_cache is on
        x = named.get("inputs_embeds")
        if x is None:
            x = named.get("input_ids")
        if x is None:
            raise ValueError("QSVD decoder stack: neither input_ids nor inputs_embeds given")
        B, T = x.shape[0], x.shape[1]
        try:
            cache.begin_step(B, T, named.get("attention_mask"), named.get("position_ids"), x.device)
        except Exception:
            cache.abandon_step()  # a refused first step leaves the cache as new
            raise
        self.current = cache
        # A cache the caller passed is used whatever use_cache says (as
        # transformers does); one made here is returned only with use_cache.
        if passed or use_cache:
            named[self.cache_param] = cache
        return (), named

    def post_hook(self, module, args, kwargs, output):
        """Commits the step; registered with always_call, so a forward that
        raised (output None) abandons it instead."""
        cache, self.current = self.current, None
        if cache is not None and cache.step is not None:
            if output is None:
                cache.abandon_step()
            else:
                cache.end_step()
        return output


class QSVDDecoderAttention(nn.Module):
    """Replaces a RoPE decoder attention block (LLaMA family; GQA)."""

    def __init__(self, original: nn.Module, projector, family, stack: DecoderStack):
        super().__init__()
        self.projector = projector
        self.o_proj = getattr(original, family.out_proj)
        self.family = family
        self.config = getattr(original, "config", None)
        self.layer_idx = original.layer_idx
        self.head_dim = projector.dims.head_dim
        self.scaling = getattr(original, "scaling", self.head_dim**-0.5)
        self.is_causal = True
        self.sliding_window = family.sliding_window(original)
        self._stack = stack  # plain object, not a submodule
        if projector.backend == "ops":
            refuse_k_bias(projector.k_bias, f"layer {self.layer_idx}", NotImplementedError,
                          "use backend='torch' for this model")

    def _cache(self, kwargs) -> QSVDLatentCache:
        passed = [v for v in kwargs.values() if isinstance(v, QSVDLatentCache)]
        current = self._stack.current if self._stack is not None else None
        cache = passed[0] if passed else current
        if cache is None or cache.step is None:
            other = [type(v).__name__ for v in kwargs.values() if isinstance(v, Cache)]
            raise RuntimeError(
                f"QSVD decoder attention (layer {self.layer_idx}) found no QSVDLatentCache for this call"
                + (f" (it got a {', '.join(other)})" if other else "")
                + ": it keeps K and V only as the latent in that cache, and would otherwise attend to this call's "
                  "tokens alone. Call the model the block belongs to (its decoder stack attaches the cache), or "
                  "pass past_key_values/cache=QSVDLatentCache(model).")
        if current is not None and cache is not current:
            raise RuntimeError("two different QSVDLatentCaches reached one step (the decoder stack's and this call's)")
        return cache

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = self._cache(kwargs)
        step = cache.step
        B, T, E = hidden_states.shape
        if tuple(step.real.shape) != (B, T):
            raise RuntimeError(f"the cache planned a step of {tuple(step.real.shape)} columns, this call has {(B, T)}")
        if position_embeddings is None:
            raise ValueError("QSVDDecoderAttention needs the model's rotary position_embeddings")
        if self.sliding_window is not None and step.max_len > self.sliding_window:
            raise NotImplementedError(f"a sequence of {step.max_len} tokens exceeds this layer's sliding window "
                                      f"({self.sliding_window}); the QSVD block attends to the whole context")
        cache.record_rope(*position_embeddings)
        layer = cache.layers[self.layer_idx]
        proj = self.projector.latent(hidden_states.reshape(B * T, E))
        L = max(step.max_len, 1)  # the tables as far as this step's positions: the ops plan from their length
        out = self.projector.core.run(proj, self.projector.cache_view(layer.pool), step.meta, cache.rope_cos[:L],
                                      cache.rope_sin[:L], self.scaling)  # [B T, H, hd], zero at padding columns
        return self.o_proj(out.reshape(B, T, -1).to(hidden_states.dtype)), None
