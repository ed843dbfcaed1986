"""Model builders used by the CLI and the tests."""

from attncc.models.zoo import LoadedModel, load_model
from attncc.models.demo import build_demo_model

__all__ = ["LoadedModel", "build_demo_model", "load_model"]
