"""Low-rank projection onto the utilized subspace ("Revealing the Utilized Rank of Subspaces of Learning in Neural
Networks", 2024): the math, over tensors (compressor/passes/lowrank.py wires it to blocks).

For a Linear y = W x + b with calibration inputs X (N tokens):
- the input subspace U_S: the top eigenvectors of C = X^T X / N (uncentered, so W x itself is kept on the data)
  whose eigenvalues reach the fraction `tau` of the total (energy);
- the output subspace U_T: likewise from the outputs of the input-projected layer, W P_S x with P_S = U_S U_S^T,
  whose second moment is W P_S C P_S W^T (no second pass over the data);
- W' = U_T U_T^T W U_S U_S^T, the utilized rank r = min(k_S, k_T), utilization r / min(d_in, d_out);
- the factorisation: the core U_T^T W U_S (k_T x k_S, rank <= r) by SVD, W' = B A exactly at rank r, with
  A = sqrt(S) Q^T U_S^T (r x d_in, the first Linear) and B = U_T P sqrt(S) (d_out x r, the second, with the
  bias); the square roots split the singular values evenly, so the two factors have like ranges (a later
  quantizer treats them alike). A lower rank keeps the core's top singular directions.

The baselines at a given rank: plain truncated SVD of W, and activation-aware SVD (the SVD of W C^(1/2), mapped
back by C^(-1/2): the directions that matter on the data, SVD-LLM's whitening).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def energy_rank(eigvals: Tensor, tau: float) -> int:
    """The fewest leading eigenvalues (sorted descending, clamped at 0) whose sum reaches `tau` of the total."""
    if not 0 < tau <= 1:
        raise ValueError(f"energy threshold tau must be in (0, 1], got {tau}")
    e = eigvals.double().clamp_min(0)
    total = float(e.sum())
    if total <= 0:
        return 0
    c = torch.cumsum(e, 0) / total
    return int(min(int((c < tau - 1e-12).sum()) + 1, e.numel()))


def top_eig(c: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of a symmetric PSD matrix, in float64."""
    vals, vecs = torch.linalg.eigh(c.double())
    return vals.flip(0), vecs.flip(1)


@dataclass
class Subspaces:
    """A layer's utilized subspaces: U_S (d_in, k_S), U_T (d_out, k_T), the eigenvalue spectra, and the rank."""

    u_in: Tensor
    u_out: Tensor
    eig_in: Tensor
    eig_out: Tensor

    @property
    def rank(self) -> int:
        return min(self.u_in.shape[1], self.u_out.shape[1])

    def utilization(self) -> float:
        return self.rank / min(self.u_in.shape[0], self.u_out.shape[0])


def utilized_subspaces(w: Tensor, c_in: Tensor, tau_in: float, tau_out: float | None = None,
                       eig: tuple[Tensor, Tensor] | None = None, k_in: int | None = None,
                       k_out: int | None = None) -> Subspaces:
    """U_S from the input second moment `c_in` (d_in, d_in) (or its eigendecomposition `eig`, top_eig(c_in), when
    several layers or thresholds share it), U_T from the projected layer's output second moment (`k_in` / `k_out`:
    that many leading directions instead of the energy threshold: a rank budget). That moment is
    W U_S diag(lam_S) U_S^T W^T = G G^T with G = W U_S diag(sqrt(lam_S)) (U_S are C's eigenvectors), so U_T and
    its spectrum come from the SVD of G (d_out x k_S), not an eigendecomposition of a d_out x d_out matrix."""
    ev_in, vec_in = top_eig(c_in) if eig is None else eig
    k_s = energy_rank(ev_in, tau_in) if k_in is None else min(k_in, ev_in.numel())
    u_s = vec_in[:, :k_s]
    g = (w.double() @ u_s) * ev_in[:k_s].clamp_min(0).sqrt()[None, :]
    u, sv, _ = torch.linalg.svd(g, full_matrices=False)
    ev_out = sv.pow(2)
    k_t = energy_rank(ev_out, tau_in if tau_out is None else tau_out) if k_out is None else min(k_out, ev_out.numel())
    u_t = u[:, :k_t]
    return Subspaces(u_s, u_t, ev_in, ev_out)


def project(w: Tensor, sub: Subspaces) -> Tensor:
    """W' = U_T U_T^T W U_S U_S^T, in W's dtype."""
    u_s, u_t = sub.u_in, sub.u_out
    return (u_t @ (u_t.T @ w.double() @ u_s) @ u_s.T).to(w.dtype)


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) = (sqrt(s) Vh, U sqrt(s)) of the leading `rank` singular triplets."""
    r = s[:rank].clamp_min(0).sqrt()
    return r[:, None] * vh[:rank], u[:, :rank] * r[None, :]


def utilized_factors(w: Tensor, sub: Subspaces, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """A (r, d_in) and B (d_out, r) with B A = W' at r = the utilized rank (exact), or its best rank-`rank`
    approximation inside the subspaces (the core's leading singular directions)."""
    r = sub.rank if rank is None else min(rank, sub.rank)
    core = sub.u_out.T @ w.double() @ sub.u_in  # (k_T, k_S)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    a, b = _split(u, s, vh, r)
    return (a @ sub.u_in.T).to(w.dtype), (sub.u_out @ b).to(w.dtype)


def svd_factors(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Plain truncated SVD of W: A (rank, d_in), B (d_out, rank)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a, b = _split(u, s, vh, rank)
    return a.to(w.dtype), b.to(w.dtype)


def activation_svd_factors(w: Tensor, c_in: Tensor, rank: int, damp: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Activation-aware SVD: the truncated SVD of W S with S = C^(1/2) (C + damp mean(diag C) I, so S is invertible),
    A mapped back by S^-1. Minimises the output error ||(W - B A) X||, not the weight error."""
    c = c_in.double()
    c = c + damp * c.diagonal().mean().clamp_min(1e-30) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp_min(vals.max() * 1e-12)
    s_half = (vecs * vals.sqrt()) @ vecs.T
    s_inv = (vecs / vals.sqrt()) @ vecs.T
    u, s, vh = torch.linalg.svd(w.double() @ s_half, full_matrices=False)
    a, b = _split(u, s, vh, rank)
    return (a @ s_inv).to(w.dtype), b.to(w.dtype)


def saves_params(rank: int, d_in: int, d_out: int) -> bool:
    """Two factors of rank r store fewer numbers than W: r (d_in + d_out) < d_in d_out."""
    return rank * (d_in + d_out) < d_in * d_out


def rank_for_params(fraction: float, d_in: int, d_out: int) -> int:
    """The largest rank whose factors store at most `fraction` of W's d_in d_out numbers."""
    return max(1, int(fraction * d_in * d_out // (d_in + d_out)))


def output_rel_err(w: Tensor, w_hat: Tensor, c_in: Tensor) -> float:
    """||(W - W_hat) X||^2 / ||W X||^2 from the input second moment: tr(D C D^T) / tr(W C W^T)."""
    d = (w - w_hat).double()
    c = c_in.double()
    return float(torch.einsum("ij,jk,ik->", d, c, d) / torch.einsum("ij,jk,ik->", w.double(), c, w.double()).clamp_min(1e-300))


def factorise(w: Tensor, c: Tensor | None, method: str, tau: float, params: float | None, damp: float = 1e-6,
              eig: tuple[Tensor, Tensor] | None = None) -> tuple[tuple[Tensor, Tensor] | None, int]:
    """One layer's factors, A (r, d_in) and B (d_out, r), of w (d_out, d_in) with input second moment c (d_in, d_in)
    (None for svd), by `method` (utilized, svd, asvd) at the rank `params` allows (utilized without it: the rank the
    energy threshold `tau` gives); None where they would not save numbers. Returns (factors, the rank chosen)."""
    d_out, d_in = w.shape
    r = None if params is None else rank_for_params(params, d_in, d_out)
    if method == "utilized":
        sub = utilized_subspaces(w, c, tau, eig=eig, k_in=r, k_out=r)
        r = sub.rank
        if not saves_params(r, d_in, d_out):
            return None, r
        a, b = utilized_factors(w, sub)
    elif not saves_params(r, d_in, d_out):
        return None, r
    elif method == "svd":
        a, b = svd_factors(w, r)
    else:
        a, b = activation_svd_factors(w, c, r, damp)
    return (a.to(w.dtype), b.to(w.dtype)), r


def level_cost(f: float, d_in: int, d_out: int) -> int:
    """Numbers a layer stores at level `f`: its factors at the budget's rank, or the dense weight (f = 1, or a rank
    that would save nothing)."""
    r = rank_for_params(f, d_in, d_out)
    return r * (d_in + d_out) if f < 1 and saves_params(r, d_in, d_out) else d_in * d_out
