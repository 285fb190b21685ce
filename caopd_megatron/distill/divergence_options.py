"""What every distillation-loss path reads, in one typed object built once per step from the ``DistillConfig``.

Design decisions:
- One frozen ``DivergenceOptions`` replaces the keyword signature that ``losses.vocab_parallel_divergence``,
  ``fused_output_loss.fused_chunked_divergence`` and ``sampled_token.sampled_token_policy_gradient`` used to
  repeat: the step builds it once (``from_config``) and hands it to whichever path ``divergence`` and
  ``fused`` select (``step.response_divergence``), so a new option is one field here.
- Runtime parts ride along: the TP group the vocabulary is sharded on and the diagnostics sink (held by
  reference: the options are frozen, the sink collects).
- ``beta`` is JSD's beta for ``jsd`` and the forward-KL weight w for ``mixed`` (``from_config`` picks the
  config field). Values are checked where they are used (``divergence_math.resolve_divergence``, the
  estimators' entry points), so a direct caller gets the same one-line errors as a config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from caopd_megatron.config.schema import DistillConfig, DistillLoss
from caopd_megatron.distill.token_diagnostics import DiagnosticsSink


@dataclass(frozen=True)
class DivergenceOptions:
    """The per-token objective and how it is computed (shared by the unfused, fused and sampled-token paths)."""

    divergence: DistillLoss = "reverse_kl"  # a divergence, or vopd (sampled-token estimator of reverse KL)
    beta: float = 0.5  # jsd: beta; mixed: the forward-KL weight w
    temperature: float = 1.0  # both distributions are softmax(logits / temperature)
    real_vocab_size: Optional[int] = None  # ids >= it are padding; None: every entry is real (Vs == Vt)
    tp_group: Optional[dist.ProcessGroup] = None  # the group the vocabulary is sharded over; None: one shard
    diagnostics: Optional[DiagnosticsSink] = None  # receives the per-token diagnostics (token_diagnostics)
    fused: bool = False  # from hidden states and output weights, chunk by chunk (fused_output_loss)
    chunk_size: int = 1024  # fused: tokens per chunk
    baseline: str = "full"  # vopd: none | full | top_k
    top_k: int = 8  # vopd's top_k baseline support (the diagnostics' k is the sink's)
    reward_clip: Optional[float] = None  # vopd: lower bound on r_t

    @classmethod
    def from_config(cls, cfg: DistillConfig, real_vocab_size: Optional[int],
                    tp_group: Optional[dist.ProcessGroup] = None,
                    diagnostics: Optional[DiagnosticsSink] = None) -> "DivergenceOptions":
        """The options of ``distill.*`` for a model whose real vocabulary is ``real_vocab_size``, on ``tp_group``."""
        return cls(divergence=cfg.loss, beta=cfg.mix_weight if cfg.loss == "mixed" else cfg.beta,
                   temperature=cfg.temperature, real_vocab_size=real_vocab_size, tp_group=tp_group,
                   diagnostics=diagnostics, fused=cfg.fused, chunk_size=cfg.chunk_size,
                   baseline=cfg.vopd_baseline, top_k=cfg.top_k, reward_clip=cfg.vopd_reward_clip)
