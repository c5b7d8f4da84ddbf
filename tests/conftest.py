"""Test-wide setup: four logical CPU devices, so strategies can be tested here.

This must run before TensorFlow initialises its devices, i.e. before any test
module creates a tensor; pytest imports conftest.py first.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS,
)
