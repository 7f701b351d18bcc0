"""Evaluation: FID/KID against a held-out real set (Inception-v3 features), a linear-probe text-alignment score,
CLIP score, and sweeps of guidance x sampler x steps."""

from ldm.eval.evaluate import EvalResult, Evaluator, generate
from ldm.eval.inception import InceptionFeatures, default_inception_path
from ldm.eval.metrics import fid, kid
from ldm.eval.probe import LinearProbe, chance_level, fit_probe
from ldm.eval.sweep import SweepPoint, format_table, nfe, parse_sweep, run_sweep

__all__ = ["EvalResult", "Evaluator", "InceptionFeatures", "LinearProbe", "SweepPoint", "chance_level",
           "default_inception_path", "fid", "fit_probe", "format_table", "generate", "kid", "nfe", "parse_sweep",
           "run_sweep"]
