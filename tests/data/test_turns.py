"""The common start of a prompt and its turn's rendering, against the standard library's answer."""

from os.path import commonprefix

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data.turns import common_prefix

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

texts = st.text(st.sampled_from("ab\u00e9\U0001f469<|>"), max_size=30)


@settings(max_examples=500, derandomize=True, database=None)
@given(a=texts, b=texts, shared=texts)
def test_the_common_start_is_the_standard_librarys(a, b, shared):
    for x, y in ((a, b), (shared + a, shared + b), (shared, shared + b), (shared + a, shared)):
        assert common_prefix(x, y) == len(commonprefix([x, y]))
