"""SLQ driver diagnostics."""

import numpy as np

from hessian_tf import linalg
from hessian_tf import spectrum as spectrum_lib


def test_orthogonality_loss_of_a_float32_basis_is_that_of_its_rows():
    # The float32 basis's rows, multiplied in float64: a float32 Gram matrix would
    # report its own rounding (several times larger here) instead.
    dim, steps = 3000, 120
    matrix = np.linspace(-1.0, 50.0, dim)
    state = linalg.lanczos_init(
        np.random.default_rng(0).standard_normal(dim), steps, basis_dtype=np.float32)
    while not linalg.is_finished(state):
        state = linalg.lanczos_step(state, matrix * linalg.current_vector(state))
    rows = state.basis[: state.num_steps].astype(np.float64)
    exact = np.max(np.abs(rows @ rows.T - np.eye(state.num_steps)))
    assert abs(spectrum_lib._orthogonality_loss(state) - exact) <= 1e-12


def test_automatic_lockstep_holds_the_bases_that_fit_a_quarter_of_memory(monkeypatch):
    basis = 90 * 1000 * 8  # bytes of one draw's basis
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 4 * 3 * basis)
    assert spectrum_lib.lockstep_group(9, 90, 1000) == 3  # 3 bases fit
    assert spectrum_lib.lockstep_group(9, 90, 1000, basis_bytes_per_entry=4) == 5  # 6 fit: 5+4
    assert spectrum_lib.lockstep_group(9, 90, 1000, lockstep=1) == 1  # given, not automatic
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: basis)
    assert spectrum_lib.lockstep_group(9, 90, 1000) == 1  # none fits: one at a time
    monkeypatch.setattr(spectrum_lib, "host_memory_bytes", lambda: 2**50)
    assert spectrum_lib.lockstep_group(20, 90, 1000) == 7  # at most 8: 7, 7, 6
