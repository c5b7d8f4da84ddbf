"""Matrix-free spectral algorithms on flat float64 vectors (no Keras, no I/O)."""

from hessian_tf.linalg.density import Density, default_kernel_width, gaussian_density
from hessian_tf.linalg.lanczos import (
    BasisMemoryError,
    LanczosResult,
    LanczosState,
    current_vector,
    current_vectors,
    first_vector,
    is_finished,
    lanczos,
    lanczos_init,
    lanczos_orthogonality_loss,
    lanczos_result,
    lanczos_step,
    next_row,
    sample_state,
    zero_basis,
)
from hessian_tf.linalg.quadrature import Quadrature, tridiagonal, tridiagonal_quadrature
from hessian_tf.linalg.statistics import SpectrumStatistics, spectrum_statistics
