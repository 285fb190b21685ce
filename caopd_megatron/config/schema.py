"""Typed configuration of a CaOPD job: one dataclass per concern, one root that holds them all.

Design decisions:
- Plain dataclasses are the single source of truth for keys, types and defaults; YAML files and
  NeMo/Hydra-style command-line overrides are validated against them (see ``config/loader.py``), so an
  unknown key, a wrong type or a value outside a ``Literal`` choice fails at start-up and names the key.
- Constants with one home: the choice aliases below and ``CONFIDENCE_MARKER``; code imports them from here.
- Defaults are the embedded CPU default (a tiny Llama-style model on a synthetic task); presets shipped in
  ``config/presets/`` (``caopd demo``), ``examples/configs/*.yaml`` and the command line override them.
- Sections follow the pipeline: model/parallel/teacher build the networks; data/task feed prompts;
  rollout -> calibration (grade + rewrite) -> distill -> evaluation are the phases; optim, checkpoint,
  logging and run are the cross-cutting parts. ``warmup`` is the supervised warm-up that the embedded default
  needs to turn a random model into one that answers and states a confidence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, get_args

# Choices are typed: the loader checks a value against its field's ``Literal`` (``config/loader.py``), and the
# code that dispatches on a choice takes its names from these aliases (``typing.get_args``), so each list of
# names has one home.
Divergence = Literal["reverse_kl", "forward_kl", "jsd", "mixed"]
DistillLoss = Literal[Divergence, "vopd"]
ParamsDtype = Literal["float32", "bfloat16", "float16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
OnBadRow = Literal["fatal", "skip"]

# The marker that introduces the verbalised confidence (``calibration.marker`` overrides it per job).
CONFIDENCE_MARKER = "Confidence:"


# Attention kinds of ``model.layer_types`` (Hugging Face's names).
LayerType = Literal["full_attention", "sliding_attention"]


@dataclass
class ModelConfig:
    """A Llama-style megatron-core GPTModel (RMSNorm, SwiGLU, RoPE, GQA), with the OLMo-3 variations
    (post-sublayer norms, QK norm over the whole projection, sliding-window layers) as switches."""

    num_layers: int = 3
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    ffn_hidden_size: Optional[int] = 384  # None = 4 * hidden_size; 384 ~ Llama's 8h/3 rounded up
    kv_channels: Optional[int] = None  # None = hidden_size // num_attention_heads
    vocab_size: Optional[int] = None  # real vocabulary; None = the tokenizer's
    make_vocab_size_divisible_by: int = 128  # padded vocab is a multiple of this times TP
    max_position_embeddings: int = 256
    rotary_base: float = 10000.0
    rope_scaling: bool = False  # Llama-3.x rope scaling
    rope_scaling_factor: float = 8.0
    tie_embeddings: bool = False
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, OLMo-3)
    # head: one RMSNorm over each head's head_dim features (Qwen3); projection: one over all heads' features
    # of the q (k) projection (OLMo-2/3), its mean square summed over the TP group; moot without qk_layernorm
    qk_norm_scope: Literal["head", "projection"] = "head"
    # pre: h + f(norm(h)) (Llama, Qwen); post: h + norm(f(h)) after attention and MLP, no input norms (OLMo-2/3)
    norm_placement: Literal["pre", "post"] = "pre"
    # Sliding-window attention: a token attends to itself and the sliding_window - 1 tokens before it, on the
    # layers that layer_types (one entry per layer: full_attention | sliding_attention) marks sliding; None =
    # every layer when sliding_window is set. Local layer spec only (model.transformer_impl=local or auto).
    sliding_window: Optional[int] = None
    layer_types: Optional[List[str]] = None
    # YaRN RoPE on the full-attention layers (every layer sliding_layers() leaves full; sliding ones keep plain
    # RoPE at rotary_base), OLMo-3's long-context form. None = plain RoPE everywhere. Not with rope_scaling.
    yarn_factor: Optional[float] = None  # context stretch factor (> 0)
    yarn_original_max_position_embeddings: int = 4096  # the context the model was pretrained on
    yarn_beta_fast: float = 32.0  # rotations over that context above which frequencies are kept
    yarn_beta_slow: float = 1.0  # ... below which they are divided by yarn_factor (a linear ramp between)
    yarn_attention_factor: Optional[float] = None  # factor on cos/sin; None = 0.1 * ln(yarn_factor) + 1
    init_method_std: float = 0.02
    params_dtype: ParamsDtype = "float32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # FP8 through Transformer Engine (models/fp8.py maps these onto megatron's TransformerConfig).
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # hybrid = e4m3 forward, e5m2 gradients
    # tensorwise = current scaling; mxfp8 = Blackwell
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_layers_at_start_in_bf16: int = 0  # first decoder layers kept in bf16 (not with the delayed recipe)
    fp8_layers_at_end_in_bf16: int = 0  # last decoder layers kept in bf16 (not with the delayed recipe)
    fp8_param: bool = False  # student weights stored in FP8: FP8 weight all-gathers (DP) and less memory
    fp8_teacher: bool = False  # the teacher's forward in FP8 too (its weights stay high precision)
    # without a usable Transformer Engine: stop (error) or warn and run without FP8 (bf16)
    fp8_fallback: Literal["error", "bf16"] = "error"
    tokenizer: Optional[str] = None  # tokenizer.json or a folder holding it; None = the synthetic one
    checkpoint: Optional[str] = None  # initial weights (a caopd checkpoint directory)

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window must be >= 1, got {self.sliding_window}")
        self.check_yarn()
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"model.layer_types has {len(self.layer_types)} entries; model.num_layers={self.num_layers}")
        unknown = sorted(set(self.layer_types) - set(get_args(LayerType)))
        if unknown:
            raise ValueError(f"model.layer_types: {', '.join(map(repr, unknown))} is not one of "
                             f"{', '.join(map(repr, get_args(LayerType)))}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("model.layer_types has sliding_attention layers but model.sliding_window is not set")

    def check_yarn(self) -> None:
        if self.yarn_factor is None:
            return
        if self.rope_scaling:
            raise ValueError("model.yarn_factor and model.rope_scaling (Llama-3 scaling) exclude each other")
        positive = {"yarn_factor": self.yarn_factor, "yarn_beta_fast": self.yarn_beta_fast,
                    "yarn_beta_slow": self.yarn_beta_slow,
                    "yarn_original_max_position_embeddings": self.yarn_original_max_position_embeddings,
                    "yarn_attention_factor": 1.0 if self.yarn_attention_factor is None else self.yarn_attention_factor}
        for key, value in positive.items():
            if not value > 0:
                raise ValueError(f"model.{key} must be > 0, got {value}")

    def qk_norm_over_projection(self) -> bool:
        """Is there a QK norm, over all heads of each projection (OLMo-2/3)?"""
        return self.qk_layernorm and self.qk_norm_scope == "projection"

    def sliding_layers(self) -> list[bool]:
        """Per layer (first to last): does it attend over a sliding window?"""
        if self.sliding_window is None:
            return [False] * self.num_layers
        if self.layer_types is None:
            return [True] * self.num_layers
        return [kind == "sliding_attention" for kind in self.layer_types]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl with CUDA, gloo without
    # megatron-core's DistributedOptimizer: Adam state (and fp32 main weights) sharded over DP, gradients
    # reduce-scattered, parameters all-gathered. Only with DP > 1 (PP > 1 or DP > 1 runs the parallel path);
    # with DP = 1 it is ignored (logged) and the plain AdamW runs.
    use_distributed_optimizer: bool = False
    # DP gradient reduction overlapped with the backward: megatron-core DDP launches each bucket's all-reduce
    # (reduce-scatter with the distributed optimizer) asynchronously as soon as the last micro-batch's backward
    # has produced all of that bucket's gradients. DP > 1 only (ignored, logged, at DP = 1).
    overlap_grad_reduce: bool = False
    ddp_bucket_size: Optional[int] = None  # elements per bucket; None = megatron's default (>= 40M with overlap)


@dataclass
class TeacherConfig:
    """Who scores the revised responses with the privileged context."""

    # ema (the paper's) | frozen (copy of the initial student) | separate (another checkpoint)
    mode: Literal["ema", "frozen", "separate"] = "ema"
    ema_rate: float = 0.01  # teacher <- (1 - rate) * teacher + rate * student, per optimizer step
    replay_fraction: float = 0.0  # share of each step's revised examples also trained in the teacher's format (keeps an EMA teacher reading notes)
    checkpoint: Optional[str] = None  # separate mode: the teacher's checkpoint
    model: Optional[ModelConfig] = None  # separate mode: the teacher's architecture (None = same as student)
    use_shared_vocab: bool = False  # allow different padded vocab sizes; only the shared real vocab counts


@dataclass
class DataConfig:
    train_prompts: Optional[str] = None  # JSONL in the prompt schema; None = the synthetic task
    eval_prompts: Optional[str] = None
    on_bad_row: OnBadRow = "fatal"
    student_template: str = "Q {question} ="
    teacher_template: str = "Reference: {demonstration} {note} Q {question} ="


@dataclass
class TaskConfig:
    """The embedded default's synthetic task: sum of n digits mod 10, n drawn from [min_digits, max_digits]."""

    name: str = "digit_sum"
    min_digits: int = 1
    max_digits: int = 6
    n_train: int = 20000
    n_eval: int = 2000


@dataclass
class WarmupConfig:
    """Supervised warm-up (SFT) that makes a random model answer, state a confidence and read a privileged context."""

    steps: int = 600
    batch_size: int = 256
    lr: float = 2e-3
    teacher_format_fraction: float = 0.5  # rows in the teacher's template (demonstration + note)
    wrong_demo_fraction: float = 0.3  # teacher rows whose demonstration carries a wrong answer
    note_fraction: float = 0.5  # teacher rows that carry a confidence note
    soft_target_sigma: float = 1.0  # width (in confidence steps) of the Gaussian target over confidence tokens
    grad_clip: float = 1.0  # global gradient-norm clip of the warm-up's optimizer steps; 0 = none
    min_lr_ratio: float = 0.1  # the cosine schedule decays lr to lr * min_lr_ratio (optim.schedule applies)
    warmup_steps: Optional[int] = None  # linear lr warm-up steps; None = min(50, steps // 10)


@dataclass
class RolloutConfig:
    samples_per_prompt: int = 8
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8
    seed: int = 1234
    batch_size: int = 256  # sequences per generation batch
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    # Whose samples form the responses: the student's (on-policy) or the teacher's, drawn from its privileged
    # prompt (sequence-level KD / soft-target SFT on teacher samples); grading, rewrite and distillation follow.
    prefix_source: Literal["student", "teacher"] = "student"
    # static: the slot-cache engine (rollout/continuous.py), any device; dynamic: megatron-core's dynamic
    # inference engine (CUDA and flash-attn only; rollout/dynamic.py); auto: dynamic where it can run, else static.
    engine: Literal["static", "dynamic", "auto"] = "static"
    # Pipeline parallelism: micro-batches in flight while decoding (0 = one per stage; 1 = one at a time).
    pipeline_microbatches: int = 0


@dataclass
class CalibrationConfig:
    rewrite: bool = True  # False = the OPD/SDFT baseline (responses and privileged context left as sampled)
    precision: int = 1  # decimals of the rewritten confidence (the embedded default's tokenizer has 0.0..1.0 tokens; 2 for real models)
    marker: str = CONFIDENCE_MARKER
    note_template: Optional[str] = "Note: {confidence}"
    # verifier: p = share of the K samples the task's verifier accepts; self_consistency: share whose normalised
    # answer equals the privileged demonstration's (the anchor), or the modal answer's share without one.
    confidence_source: Literal["verifier", "self_consistency"] = "verifier"


@dataclass
class DistillConfig:
    loss: DistillLoss = "reverse_kl"  # a Divergence, or vopd (the sampled-token estimator)
    beta: float = 0.5  # JSD interpolation
    mix_weight: float = 0.5  # mixed: weight w of forward KL in w KL(q||p) + (1 - w) KL(p||q)
    vopd_baseline: Literal["none", "full", "top_k"] = "full"  # vopd: none | full (V = -KL(p||q)) | top_k (over the student's top_k)
    vopd_reward_clip: Optional[float] = None  # vopd: clip r_t = log q(y_t) - log p(y_t) from below
    top_k: int = 8  # the student's top-k support: vopd's top_k baseline and the teacher-tail diagnostic
    diagnostics: bool = True  # per-step entropies, divergence, tail, advantage sd (answer / confidence tokens)
    temperature: float = 1.0
    skip_first_tokens: int = 0  # mask the first n response tokens out of the loss
    fused: bool = False  # fused chunked loss from hidden states and output weights
    chunk_size: int = 1024
    micro_batch_size: int = 128
    steps: int = 600  # optimizer steps per training job (one rollout + rewrite per step)
    grad_clip: float = 1.0
    # "Loss collapsed" warning: loss <= collapse_loss and grad norm <= collapse_grad_norm for collapse_steps
    # consecutive steps (0 = never warn). A non-finite loss or grad norm always stops the job (exit status 3).
    collapse_loss: float = 1e-9
    collapse_grad_norm: float = 1e-9
    collapse_steps: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"distill.mix_weight must be in [0, 1], got {self.mix_weight}")
        if self.top_k < 1:
            raise ValueError(f"distill.top_k must be >= 1, got {self.top_k}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class EvaluationConfig:
    max_new_tokens: int = 8
    batch_size: int = 512
    n_bins: int = 10
    ece_bins: Literal["equal_width", "equal_mass"] = "equal_width"  # the scheme `ece` reports (both are stored)
    ece_edge_rule: Literal["exact", "linspace"] = "exact"  # exact (edges i/K) | linspace (np.linspace edges, the paper's code)
    bootstrap_samples: int = 1000  # `caopd compare`: resamples per confidence interval
    bootstrap_seed: int = 0
    confidence_level: float = 0.95
    thresholds: List[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])  # confidence gates in reports


@dataclass
class CheckpointConfig:
    save_interval: int = 200  # optimizer steps between saves; 0 = only at the end
    keep_last: int = 2
    distributed: bool = False  # also write a megatron-core distributed copy: resumable under another TP/PP/DP layout


@dataclass
class LoggingConfig:
    level: LogLevel = "INFO"
    log_interval: int = 25
    progress: bool = True
    wandb: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 1234
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    max_steps_per_job: int = 0  # `caopd run` stops (checkpointed) after this many steps; 0 = run to distill.steps
    # `caopd run` / `caopd distill` on a directory that already holds a run (checkpoints/ or train_log.jsonl):
    # resume it from its latest checkpoint | refuse (error) | new (write to a fresh sibling <dir>-2, -3, ...)
    existing: Literal["resume", "refuse", "new"] = "resume"
    # `caopd run` saves and exits (code 75) at the first step boundary where the minutes since start plus the
    # longest step so far would pass this budget; 0 = no budget. Set it below the job's --time by a save or two.
    max_minutes_per_job: float = 0.0
    # Signals that make `caopd run` finish its step, save, and exit with code 75 (README, "Running on Slurm").
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    lock: bool = True  # refuse a second live job on the same run.output_dir (lock file caopd.lock)


@dataclass
class CaOPDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


# NeMo puts the parallel sizes under ``model.``; accept those spellings as aliases of ``parallel.``.
ALIASES = {
    "model.tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "model.sequence_parallel": "parallel.sequence_parallel",
}
