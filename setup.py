"""hessian_tf: the eigenvalue density of a network's Hessian by stochastic Lanczos quadrature."""

import setuptools

setuptools.setup(
    name="hessian_tf",
    version="0.1.0",
    description=(
        "Full Hessian eigenvalue density of TensorFlow/Keras models by stochastic "
        "Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["hessian_tf", "hessian_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",  # Keras 3
        "tensorflow-datasets",
        "numpy",
        "absl-py",
        "ml-collections",
        "matplotlib",
        "scikit-learn",  # only for the embedded digits data
        "threadpoolctl>=3",  # the Lanczos algebra's BLAS threads (ThreadpoolController)
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "pyyaml"]},
    entry_points={
        "console_scripts": [
            "hessian-spectrum=hessian_tf.bin.spectrum:run",
            "hessian-train=hessian_tf.bin.train:run",
            "hessian-plot=hessian_tf.bin.plot:run",
        ],
    },
)
