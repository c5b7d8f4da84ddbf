"""hessian_tf: Hessian eigenvalue densities of Keras models by stochastic Lanczos quadrature."""

__version__ = "0.1.0"
