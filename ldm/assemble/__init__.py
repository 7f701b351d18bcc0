"""Assembly: the one place that turns a config into the objects a run or a loaded model needs.

    checks          check_inputs(cfg): every path, shard set, cache and size a run will use, before anything loads
    diffusion       the diffusion section's process, training-time distribution, objective and preconditioning
    text_encoders   the text encoder section's frozen encoder and the fingerprint of its cache
    models          the network of the model section (the one place that knows which network): constructor
                    arguments, init_from weights, LoRA, trained states, plain weights for exports
    device          resolve_device(name): the device of run.device / --device (auto: a GPU when there is one)
    components      assemble(cfg, device) -> Components; from_weights, load_exported: pipelines of trained weights
    evaluator       build_evaluator(cfg): the evaluation protocol of cfg.eval

The trainer, the export loader, the evaluator and every command get their objects from here, so a model is put
together the same way wherever it is used. Modules elsewhere take plain keyword arguments; only this package turns
configs into objects.
"""

from ldm.assemble.checks import autoencoder_config, check_inputs, check_sampler_settings, downsample_factor
from ldm.assemble.components import Components, assemble, from_weights, load_exported, sampling_defaults
from ldm.assemble.device import resolve_device
from ldm.assemble.diffusion import build_objective, build_process, build_time_sampling, precondition
from ldm.assemble.evaluator import build_evaluator
from ldm.assemble.models import build_unet, init_weights, plain_state, state_dims, unet_kwargs
from ldm.assemble.text_encoders import build_text_encoder, text_encoder_specs, text_fingerprint

__all__ = ["Components", "assemble", "autoencoder_config", "build_evaluator", "build_objective", "build_process",
           "build_text_encoder", "build_time_sampling", "build_unet", "check_inputs", "check_sampler_settings",
           "downsample_factor", "from_weights", "init_weights", "load_exported", "plain_state", "precondition",
           "resolve_device", "sampling_defaults", "state_dims", "text_encoder_specs", "text_fingerprint", "unet_kwargs"]
