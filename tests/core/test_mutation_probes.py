"""Core-floor checks that pin exact values where the other tests only bound them (issue 20's and 21's
mutation probes): each test here fails on a plausible one-line change that the rest of tests/core passes."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from torch_qode import PolynomialODE
from torch_qode.core.carleman import carleman
from torch_qode.core.factored import FactoredLevel2
from torch_qode.core.readout.hadamard import hadamard_signs
from torch_qode.core.readout_model import expected_relative_error
from torch_qode.core.tomography import tomography


# ------------------------------------------------------------------ FactoredLevel2.truncation_bound
def test_truncation_bound_equals_its_recursion_worked_by_hand():
    """Three steps with max_rank=1: the first step adds rank 1 (nothing cut, ε0 = 0), steps 2 and 3 cut
    ε1, ε2.  The recursion ``a = ‖G1‖d + ‖F2‖e, d ← a, e ← ‖G1‖²e + 2‖g‖a + ε`` then reads
    ``e = ‖G1‖²ε1 + 2‖g(2)‖‖F2‖ε1 + ε2`` and ``d = ‖F2‖ε1`` (‖g(2)‖ = ‖F0(2)‖, the third step's noise)."""
    n = 4
    rng = np.random.default_rng(11)
    F1 = rng.normal(size=(n, n)) * 0.3
    F2 = rng.normal(size=(n, n * n)) * 0.3
    table = rng.normal(size=(4, n))
    ode = PolynomialODE([lambda t: table[t], F1, F2])
    fs = FactoredLevel2(ode, max_rank=1)
    eps = []
    for _ in range(3):
        before = fs.truncation
        fs.step()
        eps.append(fs.truncation - before)
    assert eps[0] == 0.0 and eps[1] > 1e-3 and eps[2] > 1e-3     # steps 2 and 3 cut something
    G, f2 = 1.7, 0.9                                              # any bounds: the formula takes them as given
    g2 = float(np.linalg.norm(table[2]))
    e, d = fs.truncation_bound(G, f2)
    assert d == pytest.approx(f2 * eps[1], rel=1e-12)
    assert e == pytest.approx(G * G * eps[1] + 2 * g2 * f2 * eps[1] + eps[2], rel=1e-12)
    # the 2‖g‖a term is not negligible here: without its factor 2 the bound would be this much lower
    assert g2 * f2 * eps[1] > 0.1 * e


# --------------------------------------------------------------- Theorem V.1's row-sparsity count
def _plus_identity_row_sparsity(system) -> int:
    """Most non-zeros in a row of the transfer matrix ``I + A`` (what the discrete count counts)."""
    M = (system.matrix() + sp.identity(system.dim, format="csr")).tocsr()
    M.eliminate_zeros()
    return int(np.diff(M.indptr).max())


def test_discrete_sparsity_bound_is_tight_for_a_permutation_at_order_2():
    """F0 = 0, F1 = P (a cyclic permutation: one entry per row, none on the diagonal), order 2.
    ``I + A`` is ``I + P`` at level 1 (2 per row) and ``(I + P) ⊗ (I + P)`` at level 2 (2·2 = 4 per row),
    so the products count ``max_i (S_i + 1)² = 4`` is attained.  ``A`` itself loses the level-2
    diagonal (its entry ``1·1 − 1`` cancels): 3 per row."""
    n = 4
    P = np.eye(n)[np.roll(np.arange(n), 1)]
    s = carleman(PolynomialODE([None, P]), 2, "discrete")
    assert s.sparsity_bound() == 4
    assert _plus_identity_row_sparsity(s) == s.sparsity_bound()
    assert s.row_sparsity() == 3


def test_discrete_sparsity_bound_worked_by_hand_with_every_term():
    """F0 dense (S0 = 1), F1 = P (S1 = 1, S1' = 2), F2 with one entry per row (S2 = 1), order 2:
    level 1 counts S0 + S1' + S2 = 4; level 2 counts the compositions (0,1), (1,0), (0,2), (2,0), (1,1) of
    total ≤ 2: 2·S0·S1' + 2·S0·S2 + S1'² = 4 + 2 + 4 = 10."""
    n = 4
    P = np.eye(n)[np.roll(np.arange(n), 1)]
    F2 = np.zeros((n, n * n))
    F2[np.arange(n), (np.arange(n) * 5 + 1) % (n * n)] = 0.5
    s = carleman(PolynomialODE([np.ones(n), P, F2]), 2, "discrete")
    assert s.sparsity_bound() == 10
    assert s.row_sparsity() <= _plus_identity_row_sparsity(s) <= 10


def test_continuous_sparsity_bound_is_tight_for_a_permutation_at_order_2():
    """The continuous form's level 2 is ``P ⊗ I + I ⊗ P``: 2 per row, as the sum count says."""
    n = 4
    P = np.eye(n)[np.roll(np.arange(n), 1)]
    s = carleman(PolynomialODE([None, P]), 2, "continuous")
    assert s.row_sparsity() == s.sparsity_bound() == 2


# ------------------------------------------------------------------ the readout model's norm stage
def test_error_model_norm_stage_against_simulation_where_it_dominates():
    """A 4-component vector behind a block encoding of α = 40 ||v||: the success probability
    q = 1/1600 makes the norm stage ``(1 − q)/(4 q S_n)`` nearly all of the error (support and signs
    contribute < 1 %), so the model's rms error must match the simulated readouts' rms error."""
    v = np.array([0.9, -0.5, 0.3, -0.2])
    alpha = 40 * float(np.linalg.norm(v))
    shots = 10**6
    model = expected_relative_error(v, shots, norm_scale=alpha)
    no_norm = expected_relative_error(v, shots, norm="exact")
    assert no_norm < 0.1 * model                                  # the norm stage dominates
    errs = np.array([tomography(v, shots, seed=s, norm_scale=alpha).relative_error for s in range(300)])
    rms = float(np.sqrt(np.mean(errs ** 2)))
    # the mean of 300 squared errors (≈ χ²₁-like) has relative spread √(2/300) ≈ 8 %, its root half that
    assert abs(model - rms) < 0.15 * rms, (model, rms)


# --------------------------------------------------------------- the Hadamard test's outcome law
def test_hadamard_outcome_frequencies_fit_the_exact_born_probabilities():
    """With one shot a call reads −1 on component a exactly when the outcome was (a, 1), which has
    probability ``(w_a − φ_a)²/4``; the rest (the (a, 0) outcomes and "elsewhere") read all +1.  The
    frequencies of 4,000 one-shot calls fit that law (χ² goodness of fit, fixed seed)."""
    w = np.array([0.5, -0.6, 0.3, -0.2])             # v_kept/||v||: Σw² = 0.74 (some of v not kept)
    mags = np.array([0.3, 0.5, 0.6, 0.4])            # measured magnitudes, deliberately off
    phi = mags / np.linalg.norm(mags)
    p1 = (w - phi) ** 2 / 4
    expected_p = np.append(p1, 1 - p1.sum())
    rng = np.random.default_rng(5)
    M = 4000
    observed = np.zeros(w.size + 1)
    for _ in range(M):
        signs = hadamard_signs(rng, w, mags, 1)
        minus = np.flatnonzero(signs < 0)
        assert minus.size <= 1                        # one shot: at most one outcome
        observed[minus[0] if minus.size else w.size] += 1
    assert M * p1.min() > 5                           # χ² needs ≥ 5 expected per cell
    res = scipy.stats.chisquare(observed, M * expected_p)
    assert res.pvalue > 1e-3, (observed, M * expected_p)
    # and the law is the right size: the negative components mostly read (a, 1)
    assert math.isclose(observed[:w.size].sum() / M, p1.sum(), abs_tol=5 * math.sqrt(p1.sum() / M))

