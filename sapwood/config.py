"""Configuration as data: pydantic models, loaded from and saved to YAML.

One root :class:`Config` holds sections; a preset (``sapwood/presets/NAME.yaml``) fills ``model`` and
``parallel``; a training YAML may say ``preset: tiny`` and override any field. The checkpoint folder's
``config.yaml`` is the same format. This module imports no other sapwood module except the leaf
``errors``.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sapwood.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
MAX_UNROLL = 64  # cube.rollout: the longest unroll a training window may ask for


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(Section):
    """How rotary embeddings stretch past the trained context.

    ``none``: plain RoPE. ``linear``: positions divided by ``factor``. ``ntk``: theta raised by
    ``factor ** (d / (d - 2))``. ``dynamic_ntk``: NTK with the factor chosen from the current length.
    ``yarn``: per-frequency interpolation with attention temperature (Peng et al. 2023).
    ``llama3``: Llama 3.1's per-wavelength interpolation (long wavelengths divided by ``factor``, short ones
    kept, a smooth ramp between ``low_freq_factor`` and ``high_freq_factor``). ``longrope``: Phi-3's
    per-frequency divisors, ``short_factor`` up to ``trained_context`` and ``long_factor`` past it, cos/sin
    scaled by ``attention_factor`` (default ``sqrt(1 + ln(factor) / ln(trained_context))``).
    """

    type: Literal["none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3", "longrope"] = "none"
    factor: float = Field(1.0, ge=1.0)
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    low_freq_factor: float | None = Field(
        None, gt=0, description="llama3: wavelengths above trained_context / this are scaled"
    )
    high_freq_factor: float | None = Field(
        None, gt=0, description="llama3: wavelengths below trained_context / this are kept"
    )
    short_factor: list[float] | None = Field(
        None, description="longrope: head_dim // 2 divisors within trained_context"
    )
    long_factor: list[float] | None = Field(
        None, description="longrope: head_dim // 2 divisors past trained_context"
    )
    attention_factor: float | None = Field(
        None, gt=0, description="yarn/longrope: cos/sin scale (default: the method's)"
    )

    @model_validator(mode="after")
    def _check_method(self) -> RopeScaling:
        if self.type == "llama3":
            if self.low_freq_factor is None or self.high_freq_factor is None:
                raise ValueError("rope_scaling type 'llama3' needs low_freq_factor and high_freq_factor")
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(f"high_freq_factor={self.high_freq_factor} must be above "
                                 f"low_freq_factor={self.low_freq_factor}")
        if self.type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ValueError(
                "rope_scaling type 'longrope' needs short_factor and long_factor (head_dim // 2 each)"
            )
        return self


class ModelConfig(Section):
    """The shape of a decoder-only transformer (Llama family), with the options of the other Hugging Face
    families (biases, q/k norm, activation, sliding window; see ``FAMILY_OPTIONS`` and sapwood.model.hf)."""

    vocab_size: int = Field(ge=1)
    hidden: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int | None = Field(None, ge=1, description="defaults to heads (no GQA)")
    head_dim: int | None = Field(None, ge=1, description="defaults to hidden // heads")
    ffn: int = Field(ge=1)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    trained_context: int = Field(2048, ge=1, description="context length the model is trained at")
    max_context: int | None = Field(
        None, ge=1, description="longest context served; defaults to trained_context"
    )
    rope_scaling: RopeScaling = RopeScaling()
    rope_policy: Literal["static", "by_length"] = Field(
        "static",
        description="serving: static = rope_scaling for every request (Hugging Face semantics); by_length "
        "= plain RoPE within trained_context, past it the scaling with factor min(factor, length / "
        "trained_context)",
    )
    tied_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    qkv_bias: bool = Field(False, description="bias on the q, k, v projections (Qwen2; Llama attention_bias)")
    attention_out_bias: bool = Field(
        False, description="bias on the attention output projection (Llama attention_bias)"
    )
    mlp_bias: bool = Field(False, description="bias on the three feed-forward projections (Llama mlp_bias)")
    qk_norm: bool = Field(
        False, description="RMSNorm over head_dim on each query and key head before RoPE (Qwen3)"
    )
    activation: Literal["silu", "gelu", "gelu_tanh"] = Field(
        "silu", description="gated FFN activation (SwiGLU / GeGLU)"
    )
    sliding_window: int | None = Field(None, ge=1, description="each query sees the last N positions, itself "
                                       "included (Mistral v0.1, Phi-3 4k); null = all")
    hf_model_type: Literal["llama", "mistral", "qwen2", "qwen3", "phi3"] | None = Field(
        None,
        description="Hugging Face architecture export-hf writes (set by import-hf); null = from the options",
    )

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.kv_heads is None:
            self.__dict__["kv_heads"] = self.heads
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise ValueError(
                    f"hidden={self.hidden} is not divisible by heads={self.heads} "
                    f"({self.hidden / self.heads:g} per head); choose heads dividing hidden or set head_dim"
                )
            self.__dict__["head_dim"] = self.hidden // self.heads
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}; kv_heads must divide heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("short_factor", "long_factor"):
            factors = getattr(self.rope_scaling, name)
            if factors is not None and len(factors) != self.head_dim // 2:
                raise ValueError(
                    f"rope_scaling.{name} has {len(factors)} values; needs head_dim // 2 = "
                    f"{self.head_dim // 2}"
                )
        if self.max_context is None:
            self.__dict__["max_context"] = self.trained_context
        if self.max_context < self.trained_context:
            raise ValueError(
                f"max_context={self.max_context} is below trained_context={self.trained_context}; must be >= "
                f"it"
            )
        return self

    @property
    def kv_groups(self) -> int:
        return self.heads // self.kv_heads


# The ModelConfig options that make a model compute what each Hugging Face family computes
# (the RoPE scaling and sizes come from the checkpoint; sapwood.model.hf maps both ways).
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}, "phi3": {},
}


class ParallelConfig(Section):
    """Degrees of parallelism; their product must equal the world size."""

    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = Field(1, ge=1, description="FSDP2 shard degree")
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    cp: int = Field(
        1,
        ge=1,
        description="context-parallel degree: each sequence split over cp ranks, exact ring "
        "attention (sapwood.train.context_parallel); FSDP shards over dp_shard x cp",
    )
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int = Field(1, ge=1)
    cpu_offload: bool = False

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shard(self) -> int:
        """Ranks FSDP2 shards each parameter over: ``dp_shard x cp`` (cp ranks hold the same weights)."""
        return self.dp_shard * self.cp


class PhysicsLossConfig(Section):
    """Weights of the physics residuals (sapwood.physics) in a surrogate's training loss, and whether
    predictions are projected onto exact mass conservation (the mass fixer). The data loss is about 1 for
    persistence; at these weights the terms cut the mass drift ~20x and the energy and momentum imbalances
    ~2x without costing held-out skill, while 100x larger weights pull the surrogate back to persistence."""

    mass: float = Field(0.01, ge=0, description="weight of (global-mean ps drift / 1 Pa)^2")
    energy: float = Field(0.001, ge=0, description="weight of (energy imbalance / 1 W m-2)^2")
    momentum: float = Field(0.001, ge=0, description="weight of (angular-momentum imbalance / 0.01 m s-1)^2")
    thermo: float = Field(0.01, ge=0, description="weight of (ideal-gas + hydrostatic misfit / 2 %)^2")
    project_mass: bool = Field(True, description="apply the exact mass fixer to every prediction")


class CubeNormalization(Section):
    """Per-channel statistics (physical units) the surrogate normalizes with; filled from the cube store."""

    state_mean: list[float]
    state_std: list[float]
    tendency_std: list[float]
    param_mean: list[float] = Field(default_factory=list)
    param_std: list[float] = Field(default_factory=list)
    anomaly_std: list[float] = Field(
        default_factory=list,
        description="per-channel std of states minus their "
        "own spatial mean; when given, the surrogate scales each sample's anomalies "
        "by it and conditions on the sample's spatial means",
    )


class CubeGrid(Section):
    """The grid of the store a surrogate was trained on (filled from the store; checked against every store
    it is used with). Arrays are zlib-compressed, base64-encoded (:mod:`sapwood.model.cube` decodes them)."""

    description: str = Field(description="one line naming the grid (kind, size, lat/lon span, levels)")
    lat: list[float] = Field(
        default_factory=list, description="latitudes (1-D grids; empty when curvilinear)"
    )
    lon: list[float] = Field(
        default_factory=list, description="longitudes (1-D grids; empty when curvilinear)"
    )
    levels: list[float] = Field(default_factory=list, description="vertical coordinate values, top-down")
    vertical: str = Field("", description="standard_name of the vertical coordinate")
    curvilinear: bool = False
    global_grid: bool = False
    area: str = Field(description="cell-area weights [lat, lon] (mean 1), float32, zlib + base64")
    valid: str = Field(description="the mask [channels, lat, lon] (1 = valid), packed bits, zlib + base64")
    digest: str = Field(description="sha256 of the coordinates and area weights")
    standard_names: dict[str, str] = Field(default_factory=dict, description="variable -> CF standard_name")


class CubeAugmentConfig(Section):
    """Augmentation of a surrogate's training pairs (:mod:`sapwood.data.augment`, one fused pass per batch):
    the same longitude roll and hemispheric flip (``v`` negated) on the input state and its target, noise on
    the input only. Roll and flip map a solution of the simulator's equations to another one and keep every
    budget."""

    roll: bool = Field(False, description="shift each training pair by a random whole number of longitudes")
    flip: bool = Field(False, description="mirror each training pair north-south with probability 1/2")
    noise: float = Field(0.0, ge=0, le=10, description="input noise, a multiple of sapwood.data.augment's "
                         "DEFAULT_NOISE scales (0: none)")


class CubeRolloutConfig(Section):
    """Multi-step (autoregressive) training of a surrogate: from optimizer step ``start``, each training
    sample is a window of K+1 consecutive frames of one training run, the model is unrolled K steps from the
    window's first frame on its own predictions, and the loss is the mean over the steps (the last
    ``backprop`` of them when set) of each step's data and physics loss against the true frame. K takes the
    values of ``steps`` in turn, ``every`` optimizer steps each, the last one until the end of training. Empty
    ``steps``: one-step pairs throughout."""

    steps: list[int] = Field(
        default_factory=list, description="unroll lengths of the curriculum, e.g. [2, 4, 8]"
    )
    start: int = Field(0, ge=0, description="optimizer step at which the first unroll length begins")
    every: int = Field(
        100, ge=1, description="optimizer steps per unroll length (the last one runs to the end)"
    )
    backprop: int = Field(
        0, ge=0, description="the last this many steps of each unroll carry the loss and its gradients, "
        "through each other (0: every step; 1: the pushforward trick, earlier steps run without a graph)"
    )

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[int]) -> list[int]:
        bad = [k for k in steps if not 1 <= k <= MAX_UNROLL]
        if bad:
            raise ValueError(f"unroll length {bad[0]} is outside the allowed 1..{MAX_UNROLL}")
        return steps

    def stage_at(self, step: int) -> int:
        """The index into ``steps`` of optimizer step ``step``; -1 (one-step pairs) before ``start`` or
        without ``steps``."""
        if not self.steps or step < self.start:
            return -1
        return min((step - self.start) // self.every, len(self.steps) - 1)

    def unroll_at(self, step: int) -> int:
        """The unroll length K of optimizer step ``step`` (1 before ``start`` or without ``steps``)."""
        stage = self.stage_at(step)
        return 1 if stage < 0 else self.steps[stage]


class CubeModelConfig(Section):
    """A datacube surrogate: ``model`` gives the transformer blocks, this section the cube around them.

    A state is ``[batch, channels, lat, lon]``: the variables in ``variables`` order, each 3-D variable
    one channel per level, each of ``surface_variables`` one channel (the cube store's layout).
    Planet parameters become one conditioning token each.
    """

    variables: list[str] = ["T", "u", "v", "q", "ps", "rho", "zg"]
    surface_variables: list[str] = ["ps"]
    units: dict[str, str] = Field(default_factory=dict, description="variable -> unit string, for validation")
    levels: int = Field(0, ge=0, description="levels of the 3-D variables (0: from the store)")
    lat: int = Field(0, ge=0, description="grid rows (0: from the store)")
    lon: int = Field(0, ge=0, description="grid columns (0: from the store)")
    patch: int = Field(
        2, ge=1, description="patch side in grid points (the grid is padded to a multiple, masked)"
    )
    planet_params: list[str] = Field(default_factory=list, description="names of the conditioning parameters")
    dt_hours: float = Field(6.0, gt=0, description="time between a state and the next")
    data: str | None = Field(None, description="cube store folder (sapwood prepare) for training")
    val_runs: int = Field(
        1, ge=0, description="runs (planets) held out of training, the last ones of the store"
    )
    holdout_time: float = Field(
        0.0, ge=0, lt=1, description="final fraction of every run held out of training"
    )
    physics: PhysicsLossConfig = PhysicsLossConfig()
    augment: CubeAugmentConfig = CubeAugmentConfig()
    rollout: CubeRolloutConfig = CubeRolloutConfig()
    normalization: CubeNormalization | None = None
    grid: CubeGrid | None = Field(None, description="the store's grid (filled from the store when training)")

    @model_validator(mode="after")
    def _check_grid(self) -> CubeModelConfig:
        unknown = set(self.surface_variables) - set(self.variables)
        if unknown:
            raise ValueError(f"surface_variables {sorted(unknown)} are not in variables {self.variables}")
        return self

    def channel_slice(self, variable: str) -> slice:
        """The channels of ``variable`` (all its levels)."""
        start = 0
        for name in self.variables:
            width = 1 if name in self.surface_variables else self.levels
            if name == variable:
                return slice(start, start + width)
            start += width
        raise ConfigError(f"variable {variable!r} is not in cube.variables {self.variables}")

    @property
    def channels(self) -> int:
        return sum(1 if name in self.surface_variables else self.levels for name in self.variables)


class TextDataConfig(Section):
    """Token shards written by ``sapwood tokenize`` (``path`` holds ``meta.json``, ``tokenizer.json`` and
    ``train_*.bin`` / ``val_*.bin``)."""

    kind: Literal["text"] = "text"
    path: str = Field(description="folder written by `sapwood tokenize`")
    seq_len: int | None = Field(
        None, ge=2, description="tokens per training window; defaults to model.trained_context"
    )


class TrainConfig(Section):
    """One training run. ``batch_size`` sequences per optimizer step (all data-parallel ranks together),
    split into micro-batches of ``micro_batch_size`` per rank; the rest is gradient accumulation."""

    task: str = Field("text", description="registered task name (sapwood.train.task) or 'module:Class'")
    out_dir: str = Field("runs/train", description="checkpoints, metrics.jsonl, loss.png and final/ go here")
    steps: int = Field(ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward on one rank")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0, description="cosine floor")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables clipping")
    precision: Literal["fp32", "bf16", "fp16", "bf16-pure"] = Field(
        "fp32", description="bf16/fp16: fp32 weights, 16-bit matmuls; bf16-pure: bf16 weights and gradients, "
        "updates with stochastic rounding")
    optimizer: Literal["adamw", "adamw8bit", "adamw4bit"] = Field(
        "adamw", description="adamw8bit/adamw4bit: blockwise-quantized moments (torchao)")
    optimizer_in_backward: bool = Field(
        False,
        description="step each parameter from its gradient hook and free "
        "the gradient (needs grad_clip: null)",
    )
    loss_chunk: int | None = Field(
        None,
        ge=1,
        description="tokens per chunk of the output head + cross-entropy "
        "(the full fp32 logits are never materialized); null = one chunk",
    )
    tensorboard: bool = Field(
        False, description="also write metrics as TensorBoard events to OUT/tensorboard"
    )
    activation_checkpointing: Literal["none", "every_layer", "every_k"] = "none"
    checkpoint_every_k: int = Field(2, ge=1, description="with activation_checkpointing=every_k")
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    save_every: int = Field(100, ge=1, description="steps between training checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest K training checkpoints kept")
    max_bad_steps: int = Field(5, ge=1, description="consecutive NaN/inf steps before the run stops")
    progress: bool = True

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by micro_batch_size={self.micro_batch_size}; "
                "batch_size must be a multiple of it"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}; must be <= lr")
        return self



class LoraConfig(Section):
    """Low-rank adapters (LoRA, Hu et al. 2021) on the blocks' linear layers, trained with the base frozen:
    ``W x + (alpha / rank) * B A x`` with ``A`` ``[rank, in]`` and ``B`` ``[out, rank]`` (``B`` starts at
    zero)."""

    rank: int = Field(8, ge=1, description="rank r of A and B")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: updates are scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]] = Field(
        default_factory=lambda: ["wq", "wv"], min_length=1,
        description="linear layers to adapt: wq wk wv wo (attention), w1 w3 w2 (gate, up, down)")
    base_dtype: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="dtype of the frozen base weights; bf16 halves their memory (needs train.precision: "
        "bf16); int8 (weight-only, torchao) quarters the blocks' linear layers (train.precision: fp32, one "
        "process)",
    )


class SFTConfig(Section):
    """Supervised fine-tuning (``sapwood finetune``): a base checkpoint trained on chat or instruction JSONL
    rendered with the base's chat template, the loss on assistant tokens only."""

    base: str = Field(description="sapwood checkpoint folder to fine-tune (its tokenizer and chat template)")
    data: str = Field(description='training JSONL: {"messages": [{"role", "content"}, ...]} or '
                      '{"instruction", "input", "output"} per line')
    val_data: str | None = Field(None, description="held-out JSONL; default: the last val_fraction of data")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of data held out when val_data is not set"
    )
    seq_len: int | None = Field(
        None, ge=2, description="tokens per packed row; default model.trained_context"
    )
    pack: bool = Field(True, description="pack several examples per row (attention never crosses examples)")
    eval_examples: int = Field(64, ge=0, description="held-out examples answered greedily for exact match")
    max_new_tokens: int = Field(32, ge=1, description="answer length limit for exact match")
    lora: LoraConfig | None = Field(None, description="train low-rank adapters instead of every weight")


class GrowthAmounts(Section):
    """What one growth event adds to the model (each 0 = leave that dimension alone)."""

    layers: int = Field(0, ge=0, description="blocks to insert")
    layer_position: Literal["end", "middle", "evenly"] = "evenly"
    depth_init: Literal["identity", "stack"] = Field(
        "identity", description="new blocks: random inputs or copies"
    )
    ffn: int = Field(0, ge=0, description="SwiGLU units to add per block")
    hidden: int = Field(0, ge=0, description="residual dimensions to add")
    heads: int = Field(0, ge=0, description="query heads to add")
    kv_heads: int = Field(0, ge=0, description="kv heads to add")


class PlateauTrigger(Section):
    """Grow when the mean loss of the last ``window`` steps improved on the ``window`` before it by less
    than ``min_rel_improvement`` (relative)."""

    window: int = Field(ge=1)
    min_rel_improvement: float = Field(0.01, ge=0)


class GradNormTrigger(Section):
    """Grow when the mean gradient norm of the last ``window`` steps is below ``below``."""

    window: int = Field(10, ge=1)
    below: float = Field(gt=0)


class SpikeGuard(Section):
    """Block growth while the loss is above ``factor`` x the median of the previous ``window`` steps."""

    window: int = Field(20, ge=1)
    factor: float = Field(1.5, gt=1)


class GrowthCaps(Section):
    """Limits growth never passes (a memory budget is checked with sapwood.sizing)."""

    max_layers: int | None = Field(None, ge=1)
    max_hidden: int | None = Field(None, ge=1)
    max_ffn: int | None = Field(None, ge=1)
    max_heads: int | None = Field(None, ge=1)
    max_params: int | None = Field(None, ge=1)
    memory_budget_gb: float | None = Field(
        None, gt=0, description="training memory per device, from sapwood size"
    )


class GrowthConfig(Section):
    """Growth during training (sapwood.grow): when to grow, by how much, and the limits."""

    at_steps: list[int] = Field(default_factory=list, description="grow after these optimizer steps")
    at_tokens: list[int] = Field(default_factory=list, description="grow once this many tokens were trained")
    plateau: PlateauTrigger | None = None
    grad_norm: GradNormTrigger | None = None
    spike_guard: SpikeGuard | None = None
    cooldown_steps: int = Field(0, ge=0, description="steps after an event during which no other fires")
    min_step: int = Field(0, ge=0, description="no event before this step")
    max_events: int = Field(1, ge=0)
    add: GrowthAmounts = GrowthAmounts()
    caps: GrowthCaps = GrowthCaps()
    log_file: str = Field("growth.jsonl", description="JSONL of growth events, in the training out_dir")
    method: Literal["zero", "masked"] = Field(
        "masked", description="masked: new parts random, entering through masks that ramp 0 -> 1 over "
        "mask_ramp_steps (sapwood.grow.masked); zero: zero-initialized new outputs; both function-preserving")
    mask_ramp_steps: int = Field(
        100, ge=1, description="method masked: optimizer steps of the 0 -> 1 mask ramp"
    )
    rewarm_steps: int = Field(
        0,
        ge=0,
        description="after each event the LR ramps linearly from 1/rewarm_steps "
        "of the schedule's value back to it over this many steps (0 = no re-warm-up)",
    )


class ContextExtension(Section):
    """Extend a trained checkpoint to a longer context (the YaRN / LongRoPE recipe): start from
    ``init_from``'s weights and shape, set the RoPE scaling, and fine-tune (``train.steps``) on sequences of
    ``seq_len`` tokens. ``trained_context`` stays the original length (the scalings' reference, Hugging
    Face's ``original_max_position_embeddings``); ``max_context`` becomes ``trained_context x factor``
    unless given."""

    init_from: str = Field(description="checkpoint folder to extend (config.yaml + weights)")
    rope_scaling: RopeScaling = Field(description="e.g. {type: yarn, factor: 4}")
    seq_len: int = Field(ge=2, description="tokens per fine-tuning sequence (the task's window length)")
    mixed_lengths: list[int] | None = Field(
        None,
        min_length=1,
        description="passkey task: each fine-tuning micro-batch's length drawn (seeded) from "
        "this list instead of seq_len, so the original length is kept while the long one is learnt",
    )
    max_context: int | None = Field(
        None, ge=1, description="longest context served; default trained_context x factor"
    )


class Config(Section):
    """The root config: the model shape, the parallel plan and one optional section per stage."""

    name: str = "custom"
    description: str = ""
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig | None = None
    data: TextDataConfig | None = None
    cube: CubeModelConfig | None = None
    growth: GrowthConfig | None = None
    context: ContextExtension | None = None
    sft: SFTConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_from_the_checkpoint_to_extend(cls, data: Any) -> Any:
        """With ``context.init_from`` and no ``model:``, the shape is the checkpoint's."""
        if isinstance(data, dict) and isinstance(data.get("context"), dict) and "model" not in data:
            source = data["context"].get("init_from")
            if isinstance(source, str):
                saved = Path(source) / "config.yaml"
                if not saved.exists():
                    raise ValueError(
                        f"context.init_from={source!r} has no config.yaml; give a checkpoint folder "
                        "(e.g. a run's final/)"
                    )
                data = dict(data, model=_read_yaml(saved).get("model"))
        return data

    @model_validator(mode="after")
    def _extended_context(self) -> Config:
        """``context:`` sets the model's RoPE scaling and max_context."""
        ext = self.context
        if ext is not None:
            longest = ext.max_context or int(self.model.trained_context * ext.rope_scaling.factor)
            if ext.seq_len > longest:
                raise ValueError(
                    f"context.seq_len={ext.seq_len} is above the extended max_context={longest}; "
                    "raise rope_scaling.factor or context.max_context"
                )
            for length in ext.mixed_lengths or []:
                if not 2 <= length <= longest:
                    raise ValueError(
                        f"context.mixed_lengths has {length}: each length must be in 2..{longest} "
                        "(the extended max_context)"
                    )
            if ext.mixed_lengths and self.train is not None and self.train.task != "passkey":
                raise ValueError(f"context.mixed_lengths is read by train.task passkey only, not "
                                 f"{self.train.task!r}; use context.seq_len")
            model = self.model.model_dump(exclude={"rope_scaling", "max_context"})
            self.__dict__["model"] = ModelConfig(**model, rope_scaling=ext.rope_scaling,
                                                 max_context=max(longest, self.model.trained_context))
        return self

    @model_validator(mode="before")
    @classmethod
    def _cube_store_in_cube_section(cls, data: Any) -> Any:
        """A cube model reads its store from ``cube.data``; ``data:`` is the text task's token folder."""
        if isinstance(data, dict) and isinstance(data.get("data"), dict):
            store = data["data"].get("path", "STORE")
            if data.get("cube") is not None or data["data"].get("kind") == "cube":
                raise ValueError(
                    f"a datacube model reads its store from cube.data, not data:; write "
                    f"`cube: {{data: {store}}}` (a store from `sapwood prepare`) and remove data:"
                )
        return data

    @model_validator(mode="after")
    def _cube_task_by_default(self) -> Config:
        if self.cube is not None and self.train is not None and "task" not in self.train.model_fields_set:
            self.train.task = "cube"
        return self

    @model_validator(mode="after")
    def _sft_task_by_default(self) -> Config:
        if self.sft is not None and self.train is not None and "task" not in self.train.model_fields_set:
            self.train.task = "sft"
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)
        )


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def raw_config(source: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The config mapping of a preset name or YAML path, with ``preset:`` bases merged in.

    Returns the mapping and the file it came from (None for a bare preset name).
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            path = path / "config.yaml"
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = _read_yaml(path)
    elif (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
        data = _read_yaml(path)
    else:
        raise ConfigError(
            f"unknown preset or config file {str(source)!r}; presets: {', '.join(preset_names())}"
        )
    base = data.pop("preset", None)
    if base is not None:
        base_data, _ = raw_config(str(base))
        data = _deep_merge(base_data, data)
    return data, path


def _section_class(cls: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section class found by following the field names in ``path`` from ``cls``."""
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        found = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not found:
            return None
        cls = found[0]
    return cls


def allowed_keys(cls: type[BaseModel], path: tuple[Any, ...] = ()) -> list[str]:
    """The keys a YAML mapping may hold at ``path`` (``preset`` too at the top of a :class:`Config`)."""
    section = _section_class(cls, path)
    if section is None:
        return []
    keys = list(section.model_fields)
    if section is Config:
        keys.append("preset")
    return keys


def nearest_key(unknown: str, allowed: list[str]) -> str | None:
    """The allowed key a misspelt or renamed ``unknown`` most likely meant, or None.

    Spelling (``stepz`` -> ``steps``), initials of the words (``learning_rate`` -> ``lr``), or an
    allowed key that is one of the words (``num_steps`` -> ``steps``).
    """
    close = difflib.get_close_matches(unknown, allowed, n=1, cutoff=0.6)
    if close:
        return close[0]
    words = [w for w in re.split(r"[_\-\s.]+", unknown.lower()) if w]
    initials = "".join(w[0] for w in words)
    if len(words) > 1 and initials in allowed:
        return initials
    contained = [key for key in allowed if key in words]
    return max(contained, key=len) if contained else None


def _unknown_key_message(err: Any, cls: type[BaseModel] | None, where: str) -> str:
    path = tuple(err["loc"])
    loc = ".".join(str(p) for p in path)
    allowed = allowed_keys(cls, path[:-1]) if cls is not None else []
    prefix = ".".join(str(p) for p in path[:-1] if not isinstance(p, int))
    suggestion = nearest_key(str(path[-1]), allowed)
    if suggestion is not None:
        full = f"{prefix}.{suggestion}" if prefix else suggestion
        return f"{where}unknown key {loc!r}; did you mean {full!r}?"
    if allowed:
        return f"{where}unknown key {loc!r}; allowed keys here: {', '.join(allowed)}"
    return f"{where}unknown key {loc!r}; remove it (allowed keys are the documented fields)"


def format_validation_error(exc: ValidationError, where: str = "", cls: type[BaseModel] | None = None) -> str:
    """One line: the field, the value given, and what is allowed.

    Unknown keys come first (a misspelt key also makes the real one look missing), with the nearest
    valid key of ``cls`` (the validated class) at that place.
    """
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return _unknown_key_message(unknown[0], cls, where)
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}missing required field {loc!r}"
    value = err.get("input")
    shown = f"={value!r}" if loc and not isinstance(value, dict) else ""
    return f"{where}{loc}{shown}: {msg}" if loc else f"{where}{msg}"


def validate(cls: type[BaseModel], data: dict[str, Any], where: str = "") -> Any:
    """Build ``cls`` from ``data``, turning a pydantic error into a one-line :class:`ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, cls)) from None


def load_config(source: str | Path, cls: type[BaseModel] = Config) -> Any:
    """The validated config of a preset name, a YAML file or a checkpoint folder."""
    data, path = raw_config(source)
    return validate(cls, data, where=f"{path.name if path else source}: ")

