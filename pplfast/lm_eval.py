"""``pplfast.lm_eval``: importing it registers the lm-evaluation-harness model ``pplfast``, at
the path docs/models.md names; the model lives in :mod:`pplfast.models.lm_eval`."""
from .models.lm_eval import MODEL_NAME, PplfastLM, check_backends

__all__ = ["MODEL_NAME", "PplfastLM", "check_backends"]
