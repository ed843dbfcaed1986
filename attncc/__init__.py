"""attncc: an attention compiler for PyTorch.

``attncc.compile(model, policy)`` finds every attention computation in an unmodified model, rewrites each into
one attncc op (exact, or an optimized variant as the policy says) and reports what it did.
"""

from attncc.api import CompiledModule, compile
from attncc.errors import AttnccError, AttnccWarning
from attncc.export import export, load
from attncc.policy import Policy, Rule
from attncc.runtime.ops import attention

__version__ = "0.1.0"

__all__ = ["AttnccError", "AttnccWarning", "CompiledModule", "Policy", "Rule", "attention", "compile", "export", "load", "__version__"]
