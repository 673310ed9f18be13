"""Multilayer perceptrons of the paper's Sec. III A (Eq. III.1–III.3), for Theorem III.1.

``mlp([n0, n1, …, nL])`` is ``L`` Linear layers with biases and the activation σ between them
(none after the last): ``z^(1) = b^(1) + W^(1) x``, ``z^(l+1) = b^(l+1) + W^(l+1) σ(z^(l))``.
With a polynomial σ of degree s_p the gradient-descent map of the MSE loss is a polynomial ODE of
finite degree (Theorem III.1); tanh and ReLU are offered for comparison.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

from .._checks import as_int, as_real

__all__ = ["Polynomial", "mlp"]


class Polynomial(nn.Module):
    """Element-wise polynomial activation ``σ(z) = Σ_k coefficients[k] · z^k`` (fixed, not trained).

    ``Polynomial.monomial(s)`` is ``σ(z) = z^s``. ``degree`` is the index of the highest non-zero
    coefficient.
    """

    def __init__(self, coefficients: Sequence[float]):
        super().__init__()
        if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__iter__"):
            raise TypeError(f"coefficients must be a sequence of numbers (c0, c1, …, cs), got {coefficients!r}")
        coefficients = list(coefficients)
        coeffs = [as_real(c) for c in coefficients]
        if any(c is None for c in coeffs):
            raise TypeError(f"coefficients must be numbers (not bools or strings), got {coefficients!r}")
        if not coeffs or all(c == 0.0 for c in coeffs):
            raise ValueError("coefficients must hold at least one non-zero number")
        if not all(torch.isfinite(torch.tensor(coeffs))):
            raise ValueError(f"coefficients must be finite, got {coeffs}")
        while coeffs[-1] == 0.0:
            coeffs.pop()
        self.coefficients: Tuple[float, ...] = tuple(coeffs)
        self.degree: int = len(coeffs) - 1

    @classmethod
    def monomial(cls, degree: int) -> "Polynomial":
        """``σ(z) = z^degree``."""
        if as_int(degree) is None or degree < 1:
            raise ValueError(f"degree must be an int >= 1, got {degree!r}")
        return cls([0.0] * int(degree) + [1.0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(z, self.coefficients[-1])
        for c in reversed(self.coefficients[:-1]):  # Horner
            out = out * z + c
        return out

    def extra_repr(self) -> str:
        return f"coefficients={self.coefficients}"


Activation = Union[str, Tuple[str, Union[int, Sequence[float]]], nn.Module, type]


def _activation(spec: Activation) -> nn.Module:
    if isinstance(spec, str):
        if spec == "tanh":
            return nn.Tanh()
        if spec == "relu":
            return nn.ReLU()
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] == "poly":
        if isinstance(spec[1], (tuple, list)):
            return Polynomial(spec[1])
        return Polynomial.monomial(spec[1])
    elif isinstance(spec, nn.Module):
        return spec
    elif isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec()
    raise ValueError(
        f"activation must be 'tanh', 'relu', ('poly', degree), ('poly', [c0, c1, ...]), a Polynomial "
        f"or an nn.Module class or instance; got {spec!r}")


def mlp(widths: Sequence[int], activation: Activation = "tanh", bias: bool = True) -> nn.Sequential:
    """An MLP with layer widths ``widths = [n0, n1, …, nL]`` (input first, output last).

    ``activation``: ``"tanh"``, ``"relu"``, ``("poly", s)`` for ``σ(z) = z^s``,
    ``("poly", [c0, …, cs])`` or a :class:`Polynomial` for a general polynomial, or any ``nn.Module``
    class (one instance per hidden layer) or instance (shared by all hidden layers). Lists work as
    well as tuples (YAML configs). The model gets ``.num_layers`` (L = ``len(widths) - 1``) and
    ``.degree`` (s_p when the activation is polynomial, else ``None``).
    """
    try:
        widths = list(widths)
    except TypeError as exc:
        raise TypeError(f"widths must be a sequence of ints, got {type(widths).__name__}") from exc
    if len(widths) < 2:
        raise ValueError(f"widths must list at least the input and output sizes, got {widths}")
    for w in widths:
        if as_int(w) is None or w < 1:
            raise ValueError(f"widths must be ints >= 1, got {widths}")
    widths = [int(w) for w in widths]
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    act = _activation(activation)  # validates before anything is built
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(act if isinstance(activation, nn.Module) or i == 1 else _activation(activation))
        layers.append(nn.Linear(n_in, n_out, bias=bias))
    model = nn.Sequential(*layers)
    model.num_layers = len(widths) - 1
    model.degree = act.degree if isinstance(act, Polynomial) else None
    return model
