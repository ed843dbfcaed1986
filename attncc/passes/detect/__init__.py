"""Detect: find every attention computation in a canonicalized graph and describe it as an AttentionSite.

Two spellings are matched. ``scaled_dot_product_attention`` calls are read off their arguments. Everything
else is anchored at a softmax: walking back from it through the score chain (casts, scale, biases, masks,
softcapping, reshapes) must reach a matrix product ``A @ B`` (the scores), and walking forward through casts
and dropout must reach a product with the values. What does not fit but clearly is attention is returned as a
RejectedSite with the reason (and logged as a warning); a softmax that is not fed by a product (a router, a
classifier) is ignored. Each site also says which axis its softmax runs over (``axis``: tokens, or feature
channels for cross-covariance attention), found by following the contracted axis back to the projection.

One file per part:

* ``sites``: :func:`detect_sites`, the SDPA reading, and the explicit site put together from the parts below;
* ``score_chain``: the walk back from the softmax, an ordered table of rules (:data:`SCORE_RULES`);
* ``score_facts``: the score steps folded into the site's scale, softcap and masks;
* ``probabilities``: the walk forward to the product with v, a table of rules (:data:`PROBABILITY_RULES`);
* ``operands``: q, k, v read off the products (scales, transposes, GQA repeats folded), self or cross;
* ``axis``: the contracted axis (token or channel attention), a table of rules (:data:`AXIS_RULES`);
* ``writes_check``: in-place writes that would make the op read other values than the model;
* ``reading`` and ``decline``: operand reading and the Decline the matchers raise.
"""

from attncc.passes.detect.axis import AXIS_RULES, attention_axis
from attncc.passes.detect.decline import Decline
from attncc.passes.detect.probabilities import PROBABILITY_RULES
from attncc.passes.detect.score_chain import SCORE_RULES
from attncc.passes.detect.sites import detect_sites

__all__ = ["AXIS_RULES", "Decline", "PROBABILITY_RULES", "SCORE_RULES", "attention_axis", "detect_sites"]
