"""Rank, the SVD and low-rank structure: the linear algebra behind LoRA.

A matrix of rank r is a sum of r outer products, W = B @ A with B (d x r) and
A (r x k): r(d + k) numbers instead of d*k. The truncated SVD is the best
rank-r approximation in Frobenius norm (Eckart-Young), with error
sqrt(sigma_{r+1}^2 + ... + sigma_n^2). The LoRA paper (Hu et al., 2021,
https://arxiv.org/abs/2106.09685, Sec. 7) compares learned subspaces with the
normalized overlap `subspace_similarity`.
"""

from __future__ import annotations

import torch

__all__ = [
    "low_rank_approx",
    "energy_captured",
    "effective_rank",
    "subspace_similarity",
    "low_rank_storage",
]


def _check_matrix(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(w.shape)}")


def _check_rank(r: int, w: torch.Tensor) -> None:
    n = min(w.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= n:
        raise ValueError(
            f"rank r must be an integer in [0, {n}] for shape {tuple(w.shape)}, got {r!r}"
        )


def low_rank_approx(w: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of `w` in Frobenius norm: the truncated SVD.

    Args:
        w: a (d, k) matrix.
        r: the rank to keep, 0 <= r <= min(d, k).

    Returns:
        The sum of the top r singular triplets, a (d, k) matrix of rank at most r.
    """
    _check_matrix(w)
    _check_rank(r, w)
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()  # SVD needs fp32+
    u, s, vh = torch.linalg.svd(work, full_matrices=False)  # (d, n), (n,), (n, k)
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(w.dtype)  # (d, k)


def energy_captured(s: torch.Tensor, r: int | None = None) -> torch.Tensor:
    """Fraction of squared Frobenius norm held by the top singular values.

    With `r`, a scalar: sum(s[:r]**2) / sum(s**2). Without, the cumulative
    fractions for r = 1 .. len(s). `s` are singular values (any order).
    """
    s2 = torch.sort(s.double().abs(), descending=True).values ** 2
    total = s2.sum()
    if total == 0:
        raise ValueError("energy_captured: all singular values are zero, the fraction is undefined")
    cum = torch.cumsum(s2, 0) / total
    if r is None:
        return cum
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= len(s):
        raise ValueError(f"r must be an integer in [1, {len(s)}], got {r!r}")
    return cum[r - 1]


def effective_rank(w_or_s: torch.Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007): exp of the entropy of s / sum(s).

    Accepts a matrix (its singular values are taken) or a vector of singular
    values. It equals r for r equal non-zero singular values and falls between
    1 and the rank for a decaying spectrum.
    """
    s = torch.linalg.svdvals(w_or_s.double()) if w_or_s.ndim == 2 else w_or_s.double().abs()
    if s.sum() == 0:
        raise ValueError("effective_rank of an all-zero matrix is undefined")
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_similarity(u_a: torch.Tensor, u_b: torch.Tensor, i: int, j: int) -> float:
    """Normalized overlap of two subspaces (LoRA paper, Sec. 7, Eq. 4).

    phi(A, B, i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j), where the
    columns of `u_a` and `u_b` are orthonormal (e.g. left singular vectors).
    It is 1 when one subspace contains the other and 0 when they are orthogonal.
    """
    _check_matrix(u_a, "u_a")
    _check_matrix(u_b, "u_b")
    if u_a.shape[0] != u_b.shape[0]:
        raise ValueError(
            f"u_a and u_b must have the same number of rows, got {u_a.shape} and {u_b.shape}"
        )
    if not (1 <= i <= u_a.shape[1] and 1 <= j <= u_b.shape[1]):
        raise ValueError(
            f"need 1 <= i <= {u_a.shape[1]} and 1 <= j <= {u_b.shape[1]}, got i={i}, j={j}"
        )
    overlap = u_a[:, :i].double().T @ u_b[:, :j].double()  # (i, j)
    return float((overlap**2).sum() / min(i, j))


def low_rank_storage(d: int, k: int, r: int) -> dict[str, float]:
    """Numbers stored by a dense d x k matrix and by its rank-r factors B (d x r), A (r x k)."""
    dense, factored = d * k, r * (d + k)
    return {"dense": dense, "factored": factored, "ratio": factored / dense}
