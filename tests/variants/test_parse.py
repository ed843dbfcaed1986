"""Variant text <-> spec: canonical text round-trips; nothing in the text is evaluated."""

import pytest

from attncc.errors import AttnccError
from attncc.variants import VARIANTS
from attncc.variants.parse import parse_variant

TEXTS = [
    "exact",
    "local(window=256, sinks=4)",
    "local(left=100, right=0)",
    "neighborhood(kernel=7)",
    "neighborhood(kernel=(3, 5), grid=(8, 12), globals=1)",
    "topk(density=0.125)",
    "topk(block=32, k=4, sinks=0)",
    "linear(feature_map='taylor', window=64)",
    "block_sparse(pattern=bigbird(window=1, globals=1, random=1))",
]


@pytest.mark.parametrize("text", TEXTS)
def test_canonical_text_round_trips(text):
    spec = parse_variant(text)
    assert parse_variant(str(spec)) == spec
    assert spec.name == text.split("(")[0]


def test_every_family_is_registered():
    assert set(VARIANTS) == {"exact", "local", "neighborhood", "block_sparse", "topk", "linear",
                             "vertical_slash", "heads"}


@pytest.mark.parametrize("text, message", [
    ("", "non-empty"),
    ("local(window=", "cannot parse variant"),
    ("os.system('x')", "expected a name or a call"),
    ("foo(x=1)", "unknown variant 'foo'"),
    ("local(window=1, **{'a': 1})", "'\\*\\*' is not allowed"),
    ("block_sparse(pattern=nope(x=1))", "unknown pattern 'nope'"),
    ("exact(x=1)", "exact: unknown parameter 'x'; exact takes no parameters"),
])
def test_bad_text(text, message):
    with pytest.raises(AttnccError, match=message):
        parse_variant(text)
