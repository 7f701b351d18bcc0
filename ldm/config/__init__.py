"""Typed configuration: YAML files are data, the dataclasses of this package are the schema.

    schema        loading, ``key=value`` overrides, validation by dotted key (``ConfigError``), saving, flattening
    shared        the sections both stages share: run, data (and its buckets), tracking
    text          the text encoder section
    sections      the LDM config (``LDMConfig``): UNet, LoRA, diffusion, training, sampling, evaluation
    autoencoder   the stage-1 config (``AutoencoderConfig``)
    resume        the keys a resumed run may not change, derived from the fields' marks

Every key is checked when a config is loaded; the resolved config is saved with every run.
"""

from ldm.config.autoencoder import (
    AutoencoderConfig, AutoencoderEvalConfig, AutoencoderModelConfig, AutoencoderTrainConfig,
)
from ldm.config.resume import defines_model, resume_conflicts
from ldm.config.schema import ConfigError, apply_override, flatten, from_dict, load_config, save_config, to_dict
from ldm.config.sections import (
    COMPILE_KEYWORDS, MODEL_KEYS, UNET_EXTRA, AutoencoderRef, DiffusionConfig, EvalConfig, LDMConfig, LoRAConfig,
    SamplingConfig, TrainConfig, UNetConfig,
)
from ldm.config.shared import BucketConfig, DataConfig, RunConfig, TrackingConfig
from ldm.config.text import TextEncoderConfig, TextEncoderSpec

__all__ = ["COMPILE_KEYWORDS", "MODEL_KEYS", "UNET_EXTRA", "AutoencoderConfig", "AutoencoderEvalConfig",
           "AutoencoderModelConfig", "AutoencoderRef", "AutoencoderTrainConfig", "BucketConfig", "ConfigError",
           "DataConfig", "DiffusionConfig", "EvalConfig", "LDMConfig", "LoRAConfig", "RunConfig", "SamplingConfig",
           "TextEncoderConfig", "TextEncoderSpec", "TrackingConfig", "TrainConfig", "UNetConfig", "apply_override",
           "defines_model", "flatten", "from_dict", "load_config", "resume_conflicts", "save_config", "to_dict"]
