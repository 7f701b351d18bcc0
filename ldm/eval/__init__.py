"""Evaluation: one protocol for every quality claim. FID/KID against real images beside their real-vs-real floor
with bootstrap intervals, text alignment by a classifier trained on the real images beside its ceiling and chance,
CLIP score, and sweeps of guidance x sampler x steps."""

from ldm.eval.classifier import LabelClassifier, chance_level, train_classifier
from ldm.eval.evaluate import EvalResult, Evaluator, binomial_interval, summary
from ldm.eval.inception import InceptionFeatures, default_inception_path
from ldm.eval.metrics import fid, fid_kid_bootstrap, kid
from ldm.eval.prepare import prepare_evaluator
from ldm.eval.sweep import SweepPoint, format_table, markdown_table, nfe, parse_sweep, run_sweep

__all__ = ["EvalResult", "Evaluator", "InceptionFeatures", "LabelClassifier", "SweepPoint", "binomial_interval",
           "chance_level", "default_inception_path", "fid", "fid_kid_bootstrap", "format_table", "kid",
           "markdown_table", "nfe", "parse_sweep", "prepare_evaluator", "run_sweep", "summary", "train_classifier"]
