"""The first line of an error's text, as the one-line messages quote it."""

from hessian_tf.messages import first_line


def test_first_line_cuts_and_falls_back():
    error = ValueError("  first line " + "x" * 300 + "\nsecond line")
    assert first_line(error) == ("first line " + "x" * 300)[:200]
    assert first_line(error, 10) == "first line"
    assert first_line(error, None).endswith("x" * 300)
    assert first_line(ValueError("")) == ""
    assert first_line(KeyError(), fallback="KeyError") == "KeyError"
