"""Slow, obviously-correct references for the math core: explicit dense Kronecker products."""
from __future__ import annotations

import itertools
from functools import reduce

import numpy as np


def kron_all(mats):
    return reduce(np.kron, mats, np.ones((1, 1)))


def kron_power(u, k):
    return reduce(np.kron, [u] * k, np.ones(1))


def random_coefficients(rng, n, q, scale=0.2, f0=True):
    """Random dense ``[F0, F1, …, Fq]`` with entries ~ N(0, scale²/n**k)."""
    coeffs = [rng.normal(size=n) * scale if f0 else np.zeros(n)]
    for k in range(1, q + 1):
        coeffs.append(rng.normal(size=(n, n**k)) * scale / np.sqrt(n**k))
    return coeffs


def exact_map(coeffs, u, f0):
    """``u + F0 + Σ Fk u^{⊗k}``."""
    out = u + f0
    for k, Fk in enumerate(coeffs[1:], start=1):
        out = out + Fk @ kron_power(u, k)
    return out


def carleman_dense(coeffs, f0, N, form):
    """Dense ``(A, b)`` of the Carleman system, built block by block from np.kron."""
    n, q = coeffs[1].shape[0], len(coeffs) - 1
    dims = [n**j for j in range(1, N + 1)]
    off = np.concatenate([[0], np.cumsum(dims)])
    A = np.zeros((off[-1], off[-1]))
    b = np.zeros(off[-1])
    F = [f0[:, None]] + list(coeffs[1:])
    if form == "continuous":
        for j in range(1, N + 1):
            for k in range(0, q + 1):
                s = j + k - 1
                if s > N:
                    continue
                blk = sum(kron_all([np.eye(n**i), F[k], np.eye(n**(j - 1 - i))]) for i in range(j))
                if s == 0:
                    b[off[0]:off[1]] += blk[:, 0]
                else:
                    A[off[j - 1]:off[j], off[s - 1]:off[s]] += blk
        return A, b
    G = [f0[:, None], np.eye(n) + coeffs[1]] + list(coeffs[2:])
    for j in range(1, N + 1):
        for ks in itertools.product(range(q + 1), repeat=j):
            d = sum(ks)
            if d > N:
                continue
            blk = kron_all([G[k] for k in ks])
            if d == 0:
                b[off[j - 1]:off[j]] += blk[:, 0]
            else:
                A[off[j - 1]:off[j], off[d - 1]:off[d]] += blk
    A -= np.eye(off[-1])
    return A, b


def lift_dense(u, N):
    return np.concatenate([kron_power(u, j) for j in range(1, N + 1)])
