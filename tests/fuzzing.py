"""Shared pieces of the property-based tests (hypothesis): inputs a user's files might hold, and the contract."""

from hypothesis import strategies as st

from lowbit.errors import LowbitError

# JSON values of any shape, with odd Unicode in keys and strings
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
# bytes a file might hold: random, or text with a very long line
file_bytes = st.binary(max_size=2000) | st.text(max_size=300).map(str.encode) | \
    st.integers(10_000, 200_000).map(lambda n: b'{"text": "' + b"x" * n + b'"}\n')


def loads_or_says_where(fn, where: str):
    """Run ``fn``: it may succeed, or raise LowbitError in one line naming ``where``; anything else fails."""
    try:
        return fn()
    except LowbitError as e:
        msg = str(e)
        assert where in msg, (where, msg)
        assert "\n" not in msg, msg
        return None
