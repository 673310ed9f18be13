"""The three registries of the math core (Carleman forms, window solvers, readout sign schemes) and
make_solver's option checks: adding an implementation is one class and one registry line."""
import numpy as np
import pytest
import torch

from torch_qode import PolynomialODE, estimate_resources, solve_window, tomography
from torch_qode.core.carleman import FORMS, CarlemanSystem, carleman
from torch_qode.core.carleman.discrete import DiscreteCarleman
from torch_qode.core.linsolve import METHODS, check_kappa_a
from torch_qode.core.readout import SIGN_SCHEMES, SignScheme
from torch_qode.core.resources import Resources
from torch_qode.core.solvers import SOLVERS, FilteredSolver, ForwardSolver, WindowSolver, make_solver
from torch_qode.core.solvers.forward import forward
from torch_qode.core.tomography import SIGN_METHODS
from torch_qode.core.window import WindowSolution


def _ode(n=3, seed=0):
    rng = np.random.default_rng(seed)
    F1 = -0.3 * np.eye(n) + 0.05 * rng.normal(size=(n, n))
    return PolynomialODE([0.01 * rng.normal(size=n), F1, 0.02 * rng.normal(size=(n, n * n))])


@pytest.mark.parametrize("registry, names, arg", [
    (FORMS, ("discrete", "continuous"), "form"),
    (SOLVERS, ("forward", "direct", "filtered"), "solver"),
    (SIGN_SCHEMES, ("pairs", "hadamard"), "sign_method"),
])
def test_lookup_and_unknown_names(registry, names, arg):
    assert registry.names() == names and repr(registry) == repr(names) and f"{registry}" == str(names)
    for name in names:
        assert registry.lookup(name, arg) is registry[name] and name in registry
    assert "nope" not in registry and [1] not in registry          # unhashable: simply absent
    with pytest.raises(ValueError, match=rf"{arg} must be one of \(.*'{names[-1]}'\), got 'nope'"):
        registry.lookup("nope", arg)


def test_old_names_are_the_registries():
    assert METHODS is SOLVERS and SIGN_METHODS is SIGN_SCHEMES
    s = carleman(_ode(), 2, "continuous")
    assert type(s) is FORMS["continuous"] and isinstance(s, CarlemanSystem) and s.form == "continuous"
    assert type(CarlemanSystem(_ode(), 2, "discrete")) is DiscreteCarleman
    with pytest.raises(ValueError, match=r"form must be one of \('discrete', 'continuous'\)"):
        carleman(_ode(), 2, "euler")


def test_the_factory_looks_the_form_up_and_the_classes_check_their_own_name():
    """``carleman`` is the factory; a form's class builds itself and refuses another form's name; the
    old spelling ``CarlemanSystem(ode, order, form)`` is the same lookup (an unknown name is named)."""
    assert type(DiscreteCarleman(_ode(), 2)) is DiscreteCarleman
    with pytest.raises(ValueError, match=r"form must be one of \('discrete', 'continuous'\), got 'continuous'"):
        DiscreteCarleman(_ode(), 2, "continuous")
    with pytest.raises(ValueError, match=r"form must be one of \('discrete', 'continuous'\), got 'euler'"):
        CarlemanSystem(_ode(), 2, form="euler")
    u0 = np.full(3, 0.1)
    np.testing.assert_array_equal(CarlemanSystem(_ode(), 2, form="continuous").simulate(u0, 3),
                                  carleman(_ode(), 2, "continuous").simulate(u0, 3))


def test_a_new_form_is_one_class_and_one_line(monkeypatch):
    class Doubled(DiscreteCarleman):          # a toy form: the discrete one under another name
        name = "doubled"

    monkeypatch.setitem(FORMS, "doubled", Doubled)
    s = carleman(_ode(), 2, "doubled")
    assert isinstance(s, Doubled) and s.form == "doubled"
    u0 = np.full(3, 0.1)
    np.testing.assert_allclose(s.simulate(u0, 4), carleman(_ode(), 2).simulate(u0, 4))


# ------------------------------------------------------------------------------------ solvers
def test_make_solver_builds_and_validates():
    assert isinstance(make_solver("forward"), ForwardSolver)
    f = make_solver("filtered", {"kappa_a": 50})
    assert isinstance(f, FilteredSolver) and f.kappa_a == 50.0 and f.options == {"kappa_a": 50.0}
    assert make_solver(f) is f and f == make_solver("filtered", {"kappa_a": 50.0})
    assert [SOLVERS[m].needs_explicit for m in SOLVERS] == [False, True, True]
    assert [SOLVERS[m].filtering for m in SOLVERS] == [False, False, True]
    with pytest.raises(ValueError, match=r"solver must be one of \('forward', 'direct', 'filtered'\)"):
        make_solver("hhl")
    with pytest.raises(TypeError, match="solver_options must be a dict"):
        make_solver("filtered", [50])
    with pytest.raises(ValueError, match="solver_options: unknown option 'tol'.*filtered"):
        make_solver("filtered", {"kappa_a": 5, "tol": 1e-3})
    with pytest.raises(ValueError, match=r"kappa_a applies only to solver='filtered' \(solver='direct'\)"):
        make_solver("direct", {"kappa_a": 5})
    for bad in (None, 0.5, float("inf"), "x", True):
        with pytest.raises(ValueError, match="kappa_a must be a finite number ≥ 1 with solver='filtered'"):
            make_solver("filtered", {"kappa_a": bad})
    with pytest.raises(ValueError, match="solver_options must be empty"):
        make_solver(f, {"kappa_a": 3})
    with pytest.raises(ValueError, match="kappa_a applies only to method='filtered'"):
        check_kappa_a(3.0, "forward")
    check_kappa_a(None, "forward")
    check_kappa_a(3.0, "filtered")


def test_solve_window_accepts_options_and_objects():
    s = carleman(_ode(), 2)
    u0 = np.full(3, 0.1)
    a = solve_window(s, u0, 5, "filtered", kappa_a=20.0)
    b = solve_window(s, u0, 5, "filtered", solver_options={"kappa_a": 20.0})
    c = solve_window(s, u0, 5, make_solver("filtered", {"kappa_a": 20.0}))
    for other in (b, c):
        np.testing.assert_array_equal(other.X, a.X)
        assert other.as_dict() == a.as_dict()


class ToySolver(WindowSolver):
    """A toy solver: the forward recurrence, with a made-up cost of 7 gates per unknown."""

    name = "toy"
    option_names = ("scale",)

    def __init__(self, scale=1.0, *, argname="solver"):
        super().__init__(argname=argname)
        self.scale = float(scale)

    def solve(self, system, u0, T, *, kappa="auto", dense_limit=0, max_bytes=None):
        return WindowSolution(X=self.scale * forward(system, u0, T).numpy(), method=self.name, n=system.n)

    def gates(self, *, s_M, kappa, N_b, eps):
        return 7.0 * N_b


def test_a_new_solver_is_one_class_and_one_line(monkeypatch):
    monkeypatch.setitem(SOLVERS, "toy", ToySolver)
    s = carleman(_ode(), 2)
    u0 = np.full(3, 0.1)
    sol = solve_window(s, u0, 4, "toy", solver_options={"scale": 1.0})
    np.testing.assert_allclose(sol.X, solve_window(s, u0, 4).X, atol=1e-15)
    assert make_solver("toy", {"scale": 2}).scale == 2.0
    res = estimate_resources(s, 4, solver="toy")
    assert res.solver == "toy" and not res.filtering
    assert res.total_gates == pytest.approx(7.0 * res.N_b * (res.tomography_support_draws + res.tomography_shadow_shots)
                                            / res.success_probability)
    with pytest.raises(ValueError, match=r"solver must be one of \(.*'toy'\)"):
        make_solver("toy2")


def test_ledger_takes_the_formula_from_the_solver():
    s = carleman(_ode(), 2)
    legacy = estimate_resources(s, 6, kappa_a=30.0)
    new = estimate_resources(s, 6, solver=make_solver("filtered", {"kappa_a": 30.0}))
    assert legacy.as_dict() == new.as_dict() and new.solver == "filtered" and new.filtering
    assert new.total_gates == pytest.approx(new.gates_filtered * (new.tomography_support_draws
                                                                  + new.tomography_shadow_shots)
                                            / new.success_probability)
    plain = estimate_resources(s, 6)
    assert plain.solver == "forward" and plain.as_dict() == {**estimate_resources(s, 6, solver="direct").as_dict(),
                                                             "solver": "forward"}
    with pytest.raises(ValueError, match="contradicts"):
        estimate_resources(s, 6, kappa_a=3.0, solver=make_solver("filtered", {"kappa_a": 30.0}))
    with pytest.raises(ValueError, match="contradicts"):
        Resources.from_numbers(4, 1, 3, 2, 0.1, filtering=True, solver="forward")


# ------------------------------------------------------------------------------------ readout
class AllPlus(SignScheme):
    """A toy scheme that reads every sign as + without spending its shots."""

    name = "all_plus"

    def signs(self, rng, w, mags, shots):
        return np.ones(w.size)


def test_a_new_sign_scheme_is_one_class_and_one_line(monkeypatch):
    monkeypatch.setitem(SIGN_SCHEMES, "all_plus", AllPlus)
    v = np.array([0.5, -1.0, 2.0, 0.25])
    res = tomography(v, 10_000, seed=0, sign_method="all_plus")
    assert res.sign_method == "all_plus" and res.reference is None
    assert np.all(res.estimate[res.support] > 0) and res.sign_errors == 1
    t = tomography(torch.as_tensor(v), 10_000, seed=0, sign_method="pairs")
    assert t.reference is not None
    with pytest.raises(ValueError, match=r"sign_method must be one of \('pairs', 'hadamard', 'all_plus'\)"):
        tomography(v, 100, sign_method="shadow")
