"""An export's diffusers pipeline folder: ``DiffusionPipeline.from_pretrained(export / "diffusers")`` loads it.

    diffusers/model_index.json      StableDiffusionPipeline (the UNet), PixArtAlphaPipeline (the DiT with a T5
                                    encoder) or StableDiffusion3Pipeline (the MMDiT with SD3's three encoders): the
                                    network, vae, text encoders, tokenizers, scheduler
    diffusers/unet/                 the EMA UNet (UNet2DConditionModel)
    diffusers/transformer/          instead, a DiT's EMA weights (PixArtTransformer2DModel) or an MMDiT's
                                    (SD3Transformer2DModel)
    diffusers/vae/                  the autoencoder (AutoencoderKL), its latent shift folded into its 1x1 convolutions
                                    (diffusers' Stable Diffusion pipelines ignore ``shift_factor``)
    diffusers/text_encoder/, tokenizer/   the frozen text encoder (transformers), tokenizer cut at the trained length
                                    (SD3: also text_encoder_2/, tokenizer_2/ (CLIP-G) and text_encoder_3/,
                                    tokenizer_3/ (T5))
    diffusers/scheduler/            the trained process as a scheduler: the discrete chain as DDIMScheduler (sampler
                                    ddim) or DDPMScheduler (the others; small variance) with the betas, prediction,
                                    zero-terminal-SNR rescale and our samplers' grid (trailing); the rectified flow as
                                    FlowMatchEulerDiscreteScheduler with the sampling shift
    diffusers/ldm_pipeline.json     what reproduces our sample: ``call``, the arguments of the stock pipeline's call
                                    when it does (``exact``); ``reproduce``, the arguments of ``sample_like_ldm`` (the
                                    pipeline's own components and loop, plus the text mask), exact for every setting
                                    not in ``unsupported``; ``differences``, why the stock call is not exact

What the stock pipelines cannot express: our UNet's text mask (StableDiffusionPipeline passes no
``encoder_attention_mask``; the MiniLM default masks padding; PixArtAlphaPipeline passes T5's mask, as the DiT was
trained), and stepping the flow scheduler (both read the scheduler's ``init_noise_sigma``, which
FlowMatchEulerDiscreteScheduler lacks; StableDiffusion3Pipeline steps it, and takes our grid as ``sigmas``: its call is
exact on the flow, and ``sample_like_ldm`` does not read SD3's three encoders). The MMDiT's pipeline is written for
the rectified flow only: on the discrete chain StableDiffusion3Pipeline's loop gives the scheduler no generator.
PixArtAlphaPipeline lower-cases and strips each prompt before T5 reads it, ours does not: the same image for prompts
already in that form. Time grids: that scheduler shifts its
smallest time twice when it makes its own grid (it ends at shift(shift(1/T)), 0.0089 at 12 steps and shift 3, where ours
ends at shift(1/T), 0.0030); given ``sigmas = linspace(1, 1/T, steps)`` it shifts once, which is our grid, so
``reproduce`` carries those sigmas. Everything is written as plain files: exporting needs no diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.io import write_json

INFO_FILE = "ldm_pipeline.json"
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"linear": (1e-4, 2e-2), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 2e-2)}  # make_betas'
FLOW_SAMPLERS = ("euler_ode", "ddim")  # on the rectified flow both are the Euler step of the velocity ODE
# model.kind -> (the network's folder, the stock pipeline that loads the export, diffusers' class of the network)
LAYOUTS = {"unet": ("unet", "StableDiffusionPipeline", "UNet2DConditionModel"),
           "dit": ("transformer", "PixArtAlphaPipeline", "PixArtTransformer2DModel"),
           "mmdit": ("transformer", "StableDiffusion3Pipeline", "SD3Transformer2DModel")}
PIPELINE_ENCODERS = {"unet": ("hf", "clip"), "dit": ("t5",), "mmdit": ("sd3",)}  # the encoders each pipeline calls
SUFFIXES = ("", "_2", "_3")  # text_encoder/, text_encoder_2/, text_encoder_3/ (and their tokenizers)


def scheduler_config(cfg) -> tuple[dict[str, Any] | None, dict[str, Any], list[str], list[str]]:
    """(scheduler config with ``_class_name``, extra arguments that give our grid, why the stock call differs, what no
    diffusers loop reproduces) for the trained process and the configured sampler (config None: no scheduler)."""
    d, s = cfg.diffusion, cfg.sampling
    unsupported = []
    if d.precondition != "none":
        unsupported.append(f"diffusion.precondition={d.precondition!r}: the network is called inside EDM's "
                           "preconditioning")
    if d.process == "discrete" and d.prediction in PREDICTIONS:
        lo, hi = BETA_RANGE[d.schedule]
        common = dict(num_train_timesteps=d.num_timesteps, beta_schedule=SCHEDULES[d.schedule],
                      beta_start=lo if d.beta_start is None else d.beta_start,
                      beta_end=hi if d.beta_end is None else d.beta_end, prediction_type=PREDICTIONS[d.prediction],
                      clip_sample=False, thresholding=False, timestep_spacing="trailing",
                      rescale_betas_zero_snr=d.zero_terminal_snr, steps_offset=1)  # trailing ignores steps_offset
        if s.sampler == "ddim":
            if d.num_timesteps % s.steps:
                unsupported.append(f"sampling.steps={s.steps} does not divide {d.num_timesteps}: DDIMScheduler steps "
                                   f"from t to t - {d.num_timesteps // s.steps}, off the trailing grid it evaluates "
                                   "the network on (steps that divide it reproduce ours)")
            return {"_class_name": "DDIMScheduler", **common, "set_alpha_to_one": True}, {}, [], unsupported
        if s.sampler != "ddpm":
            unsupported.append(f"sampling.sampler={s.sampler!r}: the exported scheduler is DDPM's (ancestral, small "
                               "variance); swap it, e.g. DPMSolverMultistepScheduler.from_config("
                               "pipe.scheduler.config)")
        return {"_class_name": "DDPMScheduler", **common, "variance_type": "fixed_small"}, {}, [], unsupported
    if d.process == "flow" and d.prediction == "velocity":
        if s.sampler not in FLOW_SAMPLERS:
            unsupported.append(f"sampling.sampler={s.sampler!r}: the exported scheduler is the Euler step (our "
                               f"{' / '.join(FLOW_SAMPLERS)})")
        shift = s.time_shift if s.time_shift is not None else d.time_shift
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": d.num_timesteps,
                  "shift": shift, "use_dynamic_shifting": False}
        sigmas = torch.linspace(1.0, 1.0 / d.num_timesteps, s.steps, dtype=torch.float64).tolist()
        pipeline = LAYOUTS[cfg.model.kind][1]
        stock = [] if pipeline == "StableDiffusion3Pipeline" else [
            f"{pipeline} cannot step FlowMatchEulerDiscreteScheduler (it reads init_noise_sigma)"]
        return config, {"sigmas": sigmas}, stock, unsupported  # our grid: the scheduler shifts these sigmas once
    unsupported.append(f"diffusion.process={d.process!r} with prediction {d.prediction!r} has no diffusers scheduler")
    return None, {}, [], unsupported


def one_transformers_encoder(cfg) -> bool:
    """True when the text encoder is what the network's pipeline loads and calls (one transformers model; SD3's
    three)."""
    te = cfg.text_encoder
    return te.kind in PIPELINE_ENCODERS.get(cfg.model.kind, ()) and te.encoders is None


def masks_text(cfg) -> bool:
    """True when our network cross-attends under the tokenizer's mask (MiniLM; CLIP or T5 with mask_padding)."""
    te = cfg.text_encoder
    return te.kind == "hf" or (te.kind == "t5" and te.mask_padding is not False) or bool(te.mask_padding)


def unsupported_settings(cfg) -> list[str]:
    """Settings that neither the stock pipeline nor ``sample_like_ldm`` reproduces."""
    te, s, out = cfg.text_encoder, cfg.sampling, []
    pipeline = LAYOUTS[cfg.model.kind][1]
    if not one_transformers_encoder(cfg):
        wants = {"unet": "one transformers encoder (text_encoder.kind hf or clip)",
                 "dit": "one T5 encoder (text_encoder.kind t5)",
                 "mmdit": "SD3's CLIP-L, CLIP-G and T5 (text_encoder.kind sd3)"}[cfg.model.kind]
        out.append(f"text_encoder.kind={te.kind!r} (or several encoders): {pipeline} loads {wants}")
    elif te.kind == "t5" and te.mask_padding is False:
        out.append("text_encoder.mask_padding=false: PixArtAlphaPipeline runs T5 and the transformer under the "
                   "tokenizer's mask")
    elif te.kind == "clip" and (te.final_norm is False or te.projection):
        out.append("text_encoder.final_norm=false / projection=true: the pipeline reads a CLIPTextModel's hidden "
                   "states through its final norm")
    if te.null_condition != "empty":
        out.append(f"text_encoder.null_condition={te.null_condition!r}: the pipeline encodes the empty prompt")
    if s.guidance_interval is not None:
        out.append("sampling.guidance_interval: no diffusers pipeline guides only inside an interval")
    if s.guidance_rescale:
        out.append("sampling.guidance_rescale: not reproduced")
    if cfg.model.kind == "mmdit" and cfg.diffusion.process != "flow":
        out.append(f"diffusion.process={cfg.diffusion.process!r}: the MMDiT's pipeline is written for the rectified "
                   "flow (StableDiffusion3Pipeline gives the scheduler's step no generator)")
    if cfg.model.kind == "unet" and cfg.model.addition_time_embed_dim is not None:
        out.append("SDXL micro-conditioning: StableDiffusionPipeline gives the UNet no pooled text or time ids")
    return out


def fold_latent_shift(model: torch.nn.Module) -> torch.nn.Module:
    """The autoencoder with shift_factor 0 that decodes (and encodes) as the given one: the shift c moves into the
    1x1 convolutions around the latent, post_quant_conv(z + c) = post_quant_conv(z) + c W 1, and the posterior mean
    less c. diffusers' Stable Diffusion pipelines then decode latents / scaling_factor exactly as ours."""
    c = float(model.shift_factor)
    if c == 0.0:
        return model
    if model.post_quant_conv is None or model.quant_conv is None:
        raise ValueError("a latent shift without the 1x1 quant convolutions cannot be folded")
    with torch.no_grad():
        post = model.post_quant_conv
        post.bias += c * post.weight.sum(dim=(1, 2, 3))  # (C,)
        model.quant_conv.bias[:model.quant_conv.out_channels // 2] -= c  # moments are [mean, log-variance]
    model.shift_factor = 0.0
    return model


def write_pipeline(folder: Path, cfg, ema_state: dict, unet_kwargs: dict[str, Any], autoencoder_dir: Path) -> dict:
    """Write ``folder`` (an export's diffusers/) as the network's pipeline folder (LAYOUTS) where the settings allow
    (the network and the VAE always); returns what ldm_pipeline.json records."""
    import autoencoder
    from ldm.models import NETWORKS, save_diffusers

    kind = cfg.model.kind
    net = NETWORKS[kind](**unet_kwargs)
    net.load_state_dict({k: v.float() for k, v in ema_state.items()})
    autoencoder.save_diffusers(fold_latent_shift(autoencoder.load_pretrained(autoencoder_dir)), folder / "vae")
    net_folder, pipeline, net_class = LAYOUTS[kind]
    save_diffusers(net, folder / net_folder)
    scheduler, grid, stock, unsupported = scheduler_config(cfg)
    unsupported += unsupported_settings(cfg)
    if kind == "dit" and net.micro_conditioned:
        unsupported.append("model.size_conditioning: PixArtAlphaPipeline gives resolution and aspect-ratio ids only "
                           "to 1024-px transformers (sample_size 128)")
    if kind == "unet" and masks_text(cfg):
        stock.append("the text mask: our UNet ignores padded tokens; StableDiffusionPipeline passes no "
                     "encoder_attention_mask to the UNet")
    penultimate = cfg.text_encoder.kind == "clip" and cfg.text_encoder.layer == "penultimate"
    if penultimate:
        stock.append("text_encoder.layer=penultimate: StableDiffusionPipeline's clip_skip reads the prompt's "
                     "penultimate layer but the negative prompt's last one")
    info: dict[str, Any] = {"pipeline": None, "exact": False, "differences": stock + unsupported,
                            "unsupported": unsupported}
    components = None
    if scheduler is not None and one_transformers_encoder(cfg):
        try:  # the text encoder's files are read again: an export at the end of a run must not fail on them
            components = write_text_encoder(folder, cfg)
        except (OSError, ValueError) as err:
            info["unsupported"].append(f"the text encoder could not be written: {err}")
            info["differences"] = stock + info["unsupported"]
    if components is not None:
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
        optional = {"feature_extractor": [None, None], "image_encoder": [None, None]}  # components left out
        extra = {"unet": {**optional, "requires_safety_checker": False, "safety_checker": [None, None]},
                 "mmdit": optional, "dit": {}}[kind]
        write_json(folder / "model_index.json", {
            "_class_name": pipeline, **extra, net_folder: ["diffusers", net_class], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler["_class_name"]], **components})
        size, s = cfg.data.image_size, cfg.sampling
        common = {"height": size, "width": size, "guidance_scale": s.guidance}
        common.update({"clip_skip": 1} if penultimate else {})
        call_only = {  # PixArt: our length, no 1024-px size bins, the prompt as given; SD3: T5's length
            "unet": {}, "mmdit": {"max_sequence_length": cfg.text_encoder.t5_max_length},
            "dit": {"max_sequence_length": cfg.text_encoder.max_length, "use_resolution_binning": False,
                    "clean_caption": False}}[kind]
        info.update(pipeline=pipeline, scheduler=scheduler["_class_name"], exact=not stock and not unsupported,
                    call=None if stock else {**common, **call_only, "num_inference_steps": s.steps, **grid},
                    reproduce=None if unsupported or kind == "mmdit" else {
                        **common, "steps": s.steps, "mask_text": masks_text(cfg), **grid})
        if kind == "dit":
            info["prompts"] = ("PixArtAlphaPipeline lower-cases and strips each prompt before T5 reads it, ours does "
                               "not: the same image for prompts already in that form")
    write_json(folder / INFO_FILE, info)
    return info


def write_text_encoder(folder: Path, cfg) -> dict[str, list[str]]:
    """text_encoder/ and tokenizer/ of the one transformers encoder of ``cfg.text_encoder`` (SD3: text_encoder_2/,
    text_encoder_3/ and their tokenizers too); their index entries."""
    from ldm.conditioning import build_text_encoder, sd3_text_encoders

    te = cfg.text_encoder
    if te.kind == "sd3":  # CLIP-L, CLIP-G, then T5
        sd3 = sd3_text_encoders(te.path, te.max_length, te.t5_max_length)
        specs = [*sd3["specs"], *sd3["appended"]]
    else:
        specs = [te.spec(te.max_length)]
    entries = {}
    for spec, suffix in zip(specs, SUFFIXES):
        encoder = build_text_encoder(**spec)
        model, tokenizer = encoder.model, encoder.tokenizer
        if spec["kind"] == "hf" or (spec["kind"] == "t5" and spec.get("mask_padding") is not False):  # our encoder
            # runs under the tokenizer's mask: the pipeline passes it when the config says so (PixArt's always does)
            model.config.use_attention_mask = True
        tokenizer.model_max_length = spec["max_length"]  # the pipeline pads and cuts prompts to this length
        model.save_pretrained(folder / f"text_encoder{suffix}")
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
        entries.update({f"text_encoder{suffix}": ["transformers", type(model).__name__],
                        f"tokenizer{suffix}": ["transformers", type(tokenizer).__name__]})
    return entries


@torch.no_grad()
def sample_like_ldm(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float, height: int,
                    width: int, mask_text: bool = True, sigmas: list[float] | None = None,
                    clip_skip: int | None = None) -> torch.Tensor:
    """Our sample from an exported pipeline's own components: images (B, 3, H, W) in [0, 1]. Call it with
    ``**info["reproduce"]`` of the export's ldm_pipeline.json.

    The loop of StableDiffusionPipeline and PixArtAlphaPipeline (text encoding, one latent per seed, classifier-free
    guidance over [empty prompt, prompt], scheduler steps, decoding latents / scaling_factor) on the pipeline's UNet or
    transformer, plus what their calls cannot do: the tokenizer's mask as the network's ``encoder_attention_mask``
    (``mask_text``, as our network was trained), the flow's grid (``sigmas``), the penultimate CLIP layer for both
    prompts (``clip_skip``), prompts as given (PixArt's lower-cases them).
    """
    unet = getattr(pipe, "unet", None)
    net = unet if unet is not None else pipe.transformer

    def predict(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if unet is not None:
            return unet(x, t, context, encoder_attention_mask=mask).sample
        return net(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t.expand(x.shape[0]),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        masked = getattr(pipe.text_encoder.config, "use_attention_mask", False)
        out = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask if masked else None,
                                output_hidden_states=clip_skip is not None)
        if clip_skip is None:
            return out[0], tok.attention_mask.bool()
        norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm  # transformers 4 / 5
        hidden = norm(out.hidden_states[-(clip_skip + 1)])
        return hidden, tok.attention_mask.bool()

    (cond, cond_mask), (null, null_mask) = encode(list(prompts)), encode([""] * len(prompts))
    context = torch.cat([null, cond])  # (2B, L, D)
    mask = torch.cat([null_mask, cond_mask]) if mask_text else None  # (2B, L)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (1, net.config.in_channels, height // factor, width // factor)
    latents = torch.cat([torch.randn(shape, generator=g) for g in generators])  # (B, C, h, w)
    if sigmas is None:
        pipe.scheduler.set_timesteps(steps)
    else:
        pipe.scheduler.set_timesteps(sigmas=sigmas)
    latents = latents * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    for t in pipe.scheduler.timesteps:
        out = predict(torch.cat([latents, latents]), t, context, mask)
        uncond, text = out.chunk(2)  # (B, C, h, w) each
        guided = uncond + guidance_scale * (text - uncond)
        latents = pipe.scheduler.step(guided, t, latents, generator=generators).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1)
