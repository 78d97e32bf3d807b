"""lora_edu.linalg: each property below would fail for a wrong implementation."""

import math

import pytest
import torch

from lora_edu import linalg


def _matrix(d=40, k=30, seed=0, decay=1e-2):
    g = torch.Generator().manual_seed(seed)
    n = min(d, k)
    u, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, math.log10(decay), n, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, s


@pytest.mark.parametrize("r", [1, 3, 10, 29])
def test_eckart_young_error_equals_tail_singular_values(r):
    w, s = _matrix()
    err = (w - linalg.low_rank_approx(w.float(), r).double()).norm()
    assert abs(err - s[r:].pow(2).sum().sqrt()) <= 1e-5 * s[0]


@pytest.mark.parametrize("r", [1, 4, 12])
def test_low_rank_approx_has_rank_r_and_beats_random_rank_r(r):
    w, _ = _matrix(seed=1)
    w = w.float()
    approx = linalg.low_rank_approx(w, r)
    assert torch.linalg.matrix_rank(approx).item() == r
    g = torch.Generator().manual_seed(5)
    for _ in range(5):  # the best rank-r matrix in a random column space is further away
        q, _ = torch.linalg.qr(torch.randn(40, r, generator=g))  # (40, r)
        assert (w - approx).norm() < (w - q @ (q.T @ w)).norm()


def test_full_rank_approx_reproduces_the_matrix_and_rank_zero_is_zero():
    w, _ = _matrix(d=8, k=6)
    assert torch.allclose(linalg.low_rank_approx(w, 6), w, atol=1e-10)
    assert torch.count_nonzero(linalg.low_rank_approx(w, 0)) == 0


def test_low_rank_approx_rejects_bad_rank_and_shape():
    with pytest.raises(ValueError, match=r"integer in \[0, 6\]"):
        linalg.low_rank_approx(torch.zeros(8, 6), 7)
    with pytest.raises(ValueError, match="2-D"):
        linalg.low_rank_approx(torch.zeros(8), 1)


def test_energy_captured_is_one_minus_squared_relative_error():
    w, s = _matrix()
    for r in [1, 5, 20]:
        rel = (w - linalg.low_rank_approx(w, r)).norm() / w.norm()
        assert abs(linalg.energy_captured(s, r).item() - (1 - rel**2)) < 1e-9
    cum = linalg.energy_captured(s.flip(0))  # order of input does not matter
    assert torch.all(cum[1:] >= cum[:-1]) and abs(cum[-1].item() - 1) < 1e-12


def test_effective_rank_counts_equal_singular_values_and_is_smaller_for_decay():
    s = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0])
    assert abs(linalg.effective_rank(s) - 3) < 1e-9
    _, decaying = _matrix()
    assert 1 < linalg.effective_rank(decaying) < len(decaying)
    w = torch.diag(torch.tensor([5.0, 5.0]))  # a matrix gives the same as its singular values
    assert abs(linalg.effective_rank(w) - 2) < 1e-9


def test_subspace_similarity_is_one_for_same_zero_for_orthogonal_and_chance_for_random():
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    assert abs(linalg.subspace_similarity(q, q, 8, 8) - 1) < 1e-9
    assert abs(linalg.subspace_similarity(q[:, :8], q[:, 8:16], 8, 8)) < 1e-9
    # a subspace inside a bigger one: similarity 1 (normalized by min(i, j))
    assert abs(linalg.subspace_similarity(q, q, 4, 16) - 1) < 1e-9
    g = torch.Generator().manual_seed(0)
    sims = []
    for _ in range(50):
        a, _ = torch.linalg.qr(torch.randn(64, 8, generator=g, dtype=torch.float64))
        b, _ = torch.linalg.qr(torch.randn(64, 8, generator=g, dtype=torch.float64))
        sims.append(linalg.subspace_similarity(a, b, 8, 8))
    assert abs(sum(sims) / len(sims) - 8 / 64) < 0.03  # expected overlap of random subspaces


def test_low_rank_storage_counts_factors():
    st = linalg.low_rank_storage(4096, 4096, 8)
    assert st["dense"] == 4096 * 4096 and st["factored"] == 8 * (4096 + 4096)
    assert abs(st["ratio"] - 65536 / 16777216) < 1e-15
