"""YaRN rotary tables for the full-attention layers of a model whose sliding layers keep plain RoPE (OLMo-3).

Design decisions:
- The numbers follow the YaRN paper as Hugging Face's ``rope_type="yarn"`` reads it: inverse frequencies
  blended between extrapolation (``theta^-(2i/d)``) and interpolation (divided by ``factor``) by a linear ramp
  over the dimensions whose wavelengths fall between ``beta_fast`` and ``beta_slow`` rotations of the
  original context (ramp bounds floored / ceiled, clamped to ``[0, d - 1]``); the attention factor
  multiplies cos and sin, ``0.1 ln(factor) + 1`` unless given.
- megatron-core's ``YarnRotaryEmbedding`` computes the same frequencies but is one embedding for every layer,
  moves its buffers to CUDA on every call (no CPU path), and its attention factor comes from one config
  value (megatron's ``mscale`` formula, not an explicit factor); so the table here is our own and the
  attention applies it per layer (``kv_cache_attention.SlotCachedSelfAttention``).
- Tables are megatron's layout: angles ``[L, 1, 1, d]`` (the two halves repeated), fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from caopd_megatron.config.schema import ModelConfig


def default_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor for a context stretched ``factor`` times: ``0.1 mscale ln(factor) + 1`` (1 if
    ``factor <= 1``); DeepSeek-style configs divide two of these (``mscale`` / ``mscale_all_dim``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnRope:
    """YaRN parameters of one RoPE (``theta`` the base, ``head_dim`` the rotated features per head)."""

    theta: float
    head_dim: int
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: default_attention_factor(factor)

    @property
    def attention_scaling(self) -> float:
        """The factor on cos and sin (so on each of q and k after rotation)."""
        if self.attention_factor is None:
            return default_attention_factor(self.factor)
        return float(self.attention_factor)

    def correction_range(self) -> tuple[int, int]:
        """First and last rotary dimension pair of the ramp between extrapolated and interpolated frequencies."""
        def dimension_of(rotations: float) -> float:
            wavelength_ratio = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return self.head_dim * math.log(wavelength_ratio) / (2 * math.log(self.theta))

        low = math.floor(dimension_of(self.beta_fast))
        high = math.ceil(dimension_of(self.beta_slow))
        return max(low, 0), min(high, self.head_dim - 1)

    def inverse_frequencies(self, device=None) -> torch.Tensor:
        """``[head_dim / 2]`` fp32 inverse frequencies."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        powers = self.theta ** exponents
        extrapolated, interpolated = 1.0 / powers, 1.0 / (self.factor * powers)
        low, high = self.correction_range()
        span = (high - low) or 0.001  # equal bounds: a step, not a division by zero
        ramp = ((torch.arange(self.head_dim // 2, dtype=torch.float32, device=device) - low) / span).clamp(0, 1)
        keep_extrapolated = 1 - ramp
        return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated

    def angles(self, length: int, device=None) -> torch.Tensor:
        """Rotary angles of positions ``0..length-1`` in megatron's layout ``[length, 1, 1, head_dim]``."""
        positions = torch.arange(length, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, self.inverse_frequencies(device))
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def model_yarn_rope(model: ModelConfig) -> YarnRope | None:
    """The YaRN RoPE of ``model``'s full-attention layers (None: plain RoPE everywhere)."""
    if model.yarn_factor is None:
        return None
    return YarnRope(theta=float(model.rotary_base), head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
                    factor=float(model.yarn_factor),
                    original_max_position_embeddings=int(model.yarn_original_max_position_embeddings),
                    beta_fast=float(model.yarn_beta_fast), beta_slow=float(model.yarn_beta_slow),
                    attention_factor=model.yarn_attention_factor)
