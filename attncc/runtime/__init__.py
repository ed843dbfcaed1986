"""Runtime: the attncc custom ops and the dispatch from them to a backend."""

from attncc.runtime.ops import attention, attention_op

__all__ = ["attention", "attention_op"]
