"""attncc: an attention compiler for PyTorch.

``attncc.compile(model, policy)`` finds every attention computation in an unmodified model, rewrites each into
one attncc op (exact, or an optimized variant as the policy says) and reports what it did.
"""

from attncc.api import CompiledModule, compile
from attncc.calibration import AutoPolicy, Plan, auto, calibrate
from attncc.errors import AttnccError, AttnccWarning
from attncc.exporting import export, load
from attncc.policy import Policy, Rule
from attncc.runtime.ops import attention

__version__ = "0.1.0"


def __getattr__(name: str):
    # attncc.hf (the transformers integration) and attncc.kv_cache (a transformers Cache) import transformers:
    # loaded on first use, not with attncc
    if name in ("hf", "kv_cache"):
        import importlib

        return importlib.import_module(f"attncc.{name}")
    raise AttributeError(f"module 'attncc' has no attribute {name!r}")

__all__ = ["AttnccError", "AttnccWarning", "AutoPolicy", "CompiledModule", "Plan", "Policy", "Rule", "attention", "auto",
           "calibrate", "compile", "export", "load", "__version__"]
