"""The first line of an error's text, and the error raised inside a traced function, as
the one-line messages quote them."""

from hessian_tf.messages import first_line, traced_error


def test_first_line_cuts_and_falls_back():
    error = ValueError("  first line " + "x" * 300 + "\nsecond line")
    assert first_line(error) == ("first line " + "x" * 300)[:200]
    assert first_line(error, 10) == "first line"
    assert first_line(error, None).endswith("x" * 300)
    assert first_line(ValueError("")) == ""
    assert first_line(KeyError(), fallback="KeyError") == "KeyError"


def test_traced_error_names_the_error_raised_inside():
    text = ("in user code:\n\n    File \"a.py\", line 1, in f  *\n        g()\n\n"
            "    TypeError: Exception encountered when calling LSTM.call().\n    \n"
            "    \x1b[1m`dtype` variant is not compatible.\x1b[0m\n    \n"
            "    Arguments received by LSTM.call():\n      • x=1\n")
    assert traced_error(TypeError(text)) == (
        "TypeError: Exception encountered when calling LSTM.call(). "
        "`dtype` variant is not compatible.")
    assert traced_error(ValueError("in user code:\n\n    ValueError: bad shape\n")) == (
        "ValueError: bad shape")
    assert traced_error(ValueError("plain message\nmore")) == "plain message"
    assert len(traced_error(TypeError(text), 20)) == 20
