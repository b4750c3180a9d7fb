"""What pplfast needs from a causal LM, and one runner.

- :mod:`~pplfast.models.head`: the body, output layer and final transform of a model, the probe
  that checks them against its logits, its vocabulary, context and device, id checks, BOS and
  prefix rules;
- :mod:`~pplfast.models.windows`: the window schedules, pure index arithmetic;
- :mod:`~pplfast.models.runner`: windows to padded forward passes, one run loop for one model or
  two in lockstep;
- :mod:`~pplfast.models.score`: :func:`score_model`, :func:`score_texts` and their results;
  :mod:`~pplfast.models.text`: tokens and the bytes and words they cover;
- :mod:`~pplfast.models.compare`: :func:`compare_models`;
- :mod:`~pplfast.models.loading`: the one model loader, weight dtypes and device parser;
- :mod:`~pplfast.models.lm_eval`: the lm-evaluation-harness model (imported on its own: it needs
  lm-eval).
"""
from .compare import compare_models
from .loading import ModelLoadError, load_model, load_tokenizer
from .score import DocumentScore, ScoreResult, TextScores, score_model, score_texts
from .windows import MODES, Window, make_windows

__all__ = ["MODES", "DocumentScore", "ModelLoadError", "ScoreResult", "TextScores", "Window",
           "compare_models", "load_model", "load_tokenizer", "make_windows", "score_model",
           "score_texts"]
