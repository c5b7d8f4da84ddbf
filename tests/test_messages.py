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
    assert len(traced_error(TypeError(text), 20)) == 20
    # Raised as it is (traced without AutoGraph): the same line.
    keras_text = ("Exception encountered when calling LSTM.call().\n\n"
                  "\x1b[1m`dtype` variant is not compatible.\x1b[0m\n\n"
                  "Arguments received by LSTM.call():\n  • x=1\n")
    assert traced_error(TypeError(keras_text)) == traced_error(TypeError(text))
    assert traced_error(ValueError("plain message\n\nmore")) == "ValueError: plain message more"
    assert traced_error(ValueError("")) == ""
    run_time = ValueError("Graph execution error:\n\nDetected at node A defined at:\n"
                          "<stack traces unavailable>\nassertion failed: [x]\n")
    assert traced_error(run_time) == "assertion failed: [x]"


def test_first_line_of_an_op_failing_inside_a_tf_function_is_the_ops_message():
    import tensorflow as tf

    @tf.function
    def ones(n):  # 4 TB: refused by the allocator at once, nothing allocated
        return tf.reduce_sum(tf.ones(tf.stack([n, n])))

    @tf.function
    def failing(x):
        with tf.control_dependencies([tf.debugging.Assert(False, ["the ops own text"])]):
            return tf.identity(x)

    def raising(x):
        raise ValueError("raised in Python")

    @tf.function
    def python(x):  # its message holds a Python traceback, frames and source lines
        return tf.py_function(raising, [x], tf.float32)

    @tf.function
    def read(path):  # a message that starts "File "
        return tf.io.read_file(path)

    errors = []
    for function, argument in ((ones, tf.constant(10**6)), (failing, tf.constant(1.0)),
                               (python, tf.constant(1.0)), (read, tf.constant("nofs://x"))):
        try:
            function(argument)
        except tf.errors.OpError as error:
            errors.append(error)
    oom, assertion, python_error, read_error = errors
    assert first_line(python_error) == "ValueError: raised in Python"
    assert first_line(read_error).startswith("File system scheme 'nofs' not implemented")
    unavailable = tf.errors.InternalError(None, None, (
        "Graph execution error:\n\nDetected at node A defined at (most recent call last):"
        "\n<stack traces unavailable>\n\nthe op's message\n\t [[{{node A}}]]"))
    assert first_line(unavailable) == "the op's message"
    assert str(oom).startswith("Graph execution error:")  # what the line must skip
    assert first_line(oom).startswith("OOM when allocating tensor with shape[1000000,1000000]")
    assert first_line(assertion) == "assertion failed: [the ops own text]"
    from hessian_tf.bin import job_error_message
    assert "(OOM when allocating tensor with shape[1000000,1000000]" in job_error_message(oom)
