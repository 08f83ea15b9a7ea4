"""The hypergradient of the Stage-III loss L_val with respect to the masking network T.

Names as in METHOD.md: E, D, C, T; L_I, L_II, L_val the losses of Stages I, II
and III. Model of one iteration (one-step unrolling, identity in place of the
inverse Hessians, as DARTS). With the learning rates eta_E (Stage I) and eta_C
(Stage II) in force at this step and plain SGD as the linearised inner step:

    E'(T)  = E - eta_E * dL_I(E, T)/dE
    C'(E') = C - eta_C * dL_II(E', C)/dC
    d L_val(E', C'(E')) / dT = -eta_E * d2L_I/(dT dE) . w,
    w      = v - eta_C * d2L_II/(dE dC) . u,    v = dL_val/dE,  u = dL_val/dC.

What T's optimiser receives as ``T.grad`` is

    g_T = (d L_val / dT) / eta_E = - d2L_I/(dT dE) . w

Sign convention: ``g_T`` points uphill on L_val, so the optimiser's descent
step lowers L_val. Both paths from T to L_val are kept: directly through E (the
``v`` term) and through C trained on E (the ``- eta_C H u`` term). eta_C enters
inside w, where it weighs the two paths against each other. eta_E is a positive
factor common to all of g_T and is divided out: AdamW on T is blind to a
constant scale except through its epsilon, which a factor ~1e-4 would make
dominant, and at the schedule's last step (eta_E = 0) T would get no signal.

Cost (``fd`` mode, the default):
- ``w`` is computed exactly and in ONE encoder backward: u needs only C;
  ``H u`` is the E-gradient of <dL_II/dC, u>, whose C-gradient graph lives in C
  alone; so ``L_val - eta_C <dL_II/dC, u>`` is backpropagated once through the
  encoder pass that Stages II and III share.
- ``d2L_I/(dT dE) . w`` is ONE central difference. T only weights the
  per-patch errors and sees the patch embeddings as a stop-gradient input, so
      dL_I/dT (E +- eps w) = sum_i dp_i/dT * m_i * err_i(E +- eps w) / K
  and the difference needs the errors at E +- eps w under ``no_grad`` (no
  graph for E or D) plus one backward through T. eps = alpha / ||w||.
- The two passes draw identical dropout / drop-path masks (same seed), and
  the perturbed weights are new tensors passed by ``functional_call``: the
  model's parameters are never edited, so they come back bit for bit.

``exact`` mode instead differentiates through a virtual SGD step from the
current state with double backward; it is for small models and for tests.

A longer horizon (``mlo.horizon`` = K > 1): the last Stage-I batch is cut into
K chunks b_1..b_K and E takes one virtual SGD step on each,
E_j = E_{j-1} - eta_E * dL_I(E_{j-1}; b_j)/dE (D and C held where they are), so
T's weights act on E's response over K steps instead of one (the same images,
K times the distance). Reverse accumulation from lambda_K = w:

    g_T = - sum_j d2L_I(E_{j-1}; b_j)/(dT dE) . lambda_j,
    lambda_{j-1} = lambda_j - eta_E * d2L_I(E_{j-1}; b_j)/dE2 . lambda_j

``horizon_hypergradient`` (fd) takes the virtual iterates under ``no_grad``,
each Hessian-vector product by a central difference of first-order gradients
and each mixed product as above; ``exact_hypergradient`` differentiates
through the K steps. In fd mode w is taken at the current E (the Stage-II pass
that Stages II and III share), as for K = 1; the tests give both modes the
same w to check the rest to second order in eps.

The mask of the Stage-I batch (the hard choice, no gradient) is an input: the
caller draws it once (``mlo.selection`` may be random), so that every pass and
both modes see the same mask.

For data parallelism, ``sync`` (see ``mlo_mae.distributed``) is applied to u
before ``H u`` and to w before the perturbation, so every rank perturbs by the
same global direction; g_T is synced by the caller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .distributed import Sync, no_sync
from .head import ClassificationHead, cross_entropy
from .mae import MaskedAutoencoderViT
from .masking import Mask, weighted_reconstruction_loss
from .seeding import seeded


def _fp32_exactly(device: torch.device) -> contextlib.AbstractContextManager:
    """Finite differences need true fp32: no autocast, no TF32 convolutions."""
    if device.type == "cuda":
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        return stack
    return contextlib.nullcontext()


@dataclass
class Direction:
    """w (E's parameter order) and L_val; with ``split``, also the size of each path in w."""

    w: list[torch.Tensor]
    loss_val: torch.Tensor
    e_path_norm: float | None = None  # ||v||: T -> E -> L_val
    c_path_norm: float | None = None  # ||eta_C H u||: T -> E -> C'(E) -> L_val


def hyper_direction(
    mae: MaskedAutoencoderViT,
    head: ClassificationHead,
    stage2_features: torch.Tensor,
    stage2_labels: torch.Tensor,
    stage3_features: torch.Tensor,
    stage3_labels: torch.Tensor,
    lr_head: float,
    sync: Sync = no_sync,
    split: bool = False,
) -> Direction:
    """w = v - eta_C * d2L_II/(dE dC) . u, in E's parameter order (``lr_head`` is eta_C); also L_val.

    The features are encoder outputs of whole images (a Stage-II batch of D_tr,
    a Stage-III batch of D_val) that still carry their autograd graph to E (one
    shared forward, see the module docstring). ``split`` takes the two paths in
    two encoder backwards instead of one, to measure them.
    """
    c_params = [p for p in head.parameters() if p.requires_grad]
    e_params = [p for _, p in mae.encoder_named_parameters()]

    def grad_e(output: torch.Tensor, retain: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(output, e_params, allow_unused=True, retain_graph=retain)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, e_params)]

    with head.frozen_statistics():
        loss_val = cross_entropy(head(stage3_features), stage3_labels)
        u = list(torch.autograd.grad(loss_val, c_params, retain_graph=True))
        sync(u)
        loss_ii = cross_entropy(head(stage2_features), stage2_labels)
    grad_c = torch.autograd.grad(loss_ii, c_params, create_graph=True)
    hu_potential = sum((g * ui).sum() for g, ui in zip(grad_c, u))
    if not split:
        w = grad_e(loss_val - lr_head * hu_potential, retain=False)
        sync(w)
        return Direction(w, loss_val.detach())
    v = grad_e(loss_val, retain=True)
    c_path = [lr_head * g for g in grad_e(hu_potential, retain=False)]
    sync(v + c_path)  # averaging is linear: the same w as averaging w itself
    w = [a - b for a, b in zip(v, c_path)]
    return Direction(w, loss_val.detach(), _norm(v), _norm(c_path))


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def t_scores(mae: MaskedAutoencoderViT, masknet: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """T's scores p of a batch, with T's graph; its input (the patch embeddings) is a stop-gradient."""
    with torch.no_grad():
        tokens = mae.embed_patches(images)
    return masknet(tokens)


def _chunks(images: torch.Tensor, mask: Mask, horizon: int) -> list[tuple[torch.Tensor, Mask]]:
    """The Stage-I batch and its mask cut into ``horizon`` chunks along the batch (sizes differ by at most 1)."""
    parts = [torch.tensor_split(t, horizon) if t is not None else [None] * horizon
             for t in (images, mask.ids_keep, mask.ids_restore, mask.mask, mask.learned)]
    if len(parts[0]) != horizon:
        raise ValueError(f"a Stage-I batch of {len(images)} images cannot make {horizon} chunks")
    return [(x, Mask(keep, restore, m, learned)) for x, keep, restore, m, learned in zip(*parts)]


def _stage1_loss(mae: MaskedAutoencoderViT, encoder: dict[str, torch.Tensor], images: torch.Tensor, mask: Mask,
                 probs: torch.Tensor, norm: str, errors: torch.Tensor | None = None) -> torch.Tensor:
    """L_I of a chunk at the encoder weights ``encoder`` (D as it is), or of given per-patch ``errors``."""
    if errors is None:
        errors = functional_call(mae, encoder, (images, mask.ids_keep, mask.ids_restore))
    return weighted_reconstruction_loss(errors, mask.mask, probs, norm, mask.learned)


def _fd_mixed_product(mae: MaskedAutoencoderViT, encoder: dict[str, torch.Tensor], probs: torch.Tensor,
                      images: torch.Tensor, mask: Mask, direction: Sequence[torch.Tensor], alpha: float, seed: int,
                      norm: str) -> list[torch.Tensor] | None:
    """The surrogate whose T-gradient is d2L_I/(dT dE) . direction at ``encoder`` (central difference);
    None for a zero or non-finite direction."""
    d_norm = torch.sqrt(sum((d.float() ** 2).sum() for d in direction))
    if not torch.isfinite(d_norm) or d_norm == 0:
        return None
    eps = alpha / d_norm.item()
    device = images.device
    with torch.no_grad():
        errors = []
        for sign in (1.0, -1.0):
            moved = {n: p + (sign * eps) * d.to(p.dtype) for (n, p), d in zip(encoder.items(), direction)}
            with seeded(seed, device):
                errors.append(functional_call(mae, moved, (images, mask.ids_keep, mask.ids_restore)))
        delta = (errors[0] - errors[1]) / (2.0 * eps)
    return _stage1_loss(mae, encoder, images, mask, probs, norm, errors=delta)


def mixed_product_fd(
    mae: MaskedAutoencoderViT,
    masknet: nn.Module,
    stage1_images: torch.Tensor,
    w: Sequence[torch.Tensor],
    mask: Mask,
    alpha: float = 0.01,
    seed: int = 0,
    norm: str = "count",
) -> list[torch.Tensor]:
    """g_T = - d2L_I/(dT dE) . w by one central difference at E +- eps*w, on a Stage-I batch and its mask."""
    return horizon_hypergradient(mae, masknet, stage1_images, w, mask, 0.0, 1, alpha, seed, norm)


def horizon_hypergradient(
    mae: MaskedAutoencoderViT,
    masknet: nn.Module,
    stage1_images: torch.Tensor,
    w: Sequence[torch.Tensor],
    mask: Mask,
    lr_mae: float,
    horizon: int = 1,
    alpha: float = 0.01,
    seed: int = 0,
    norm: str = "count",
    probs: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """g_T through ``horizon`` virtual SGD steps of E at ``lr_mae`` (eta_E) on chunks of the Stage-I batch,
    by reverse accumulation (module docstring); w is dL_val/dE at the end of the steps. horizon 1 is one
    central difference (``mixed_product_fd``). ``probs``: T's scores of the batch with T's graph, if the
    caller has them."""
    device = stage1_images.device
    encoder = dict(mae.encoder_named_parameters())
    t_params = list(masknet.parameters())
    with _fp32_exactly(device):
        if probs is None:
            probs = t_scores(mae, masknet, stage1_images)  # the only graph built here: T's
        chunks = [(x, m, p) for (x, m), p in zip(_chunks(stage1_images, mask, horizon),
                                                   torch.tensor_split(probs, horizon))]
        # The virtual iterates E_0 .. E_{K-1}, without a graph.
        iterates = [{n: p.detach() for n, p in encoder.items()}]
        for j, (x, m, p) in enumerate(chunks[:-1]):
            grads = _encoder_gradient(mae, iterates[-1], x, m, p.detach(), norm, seed + j)
            iterates.append({n: e - lr_mae * g for (n, e), g in zip(iterates[-1].items(), grads)})
        lam = [wi.detach() for wi in w]
        surrogate = None
        for j in reversed(range(horizon)):
            x, m, p = chunks[j]
            term = _fd_mixed_product(mae, iterates[j], p, x, m, lam, alpha, seed + j, norm)
            if term is not None:
                surrogate = term if surrogate is None else surrogate + term
            if j > 0:
                hvp = _fd_hessian_product(mae, iterates[j], x, m, p.detach(), lam, alpha, seed + j, norm)
                lam = [li - lr_mae * h for li, h in zip(lam, hvp)]
    if surrogate is None:
        return [torch.zeros_like(p) for p in t_params]
    grads = torch.autograd.grad(surrogate, t_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else -g for g, p in zip(grads, t_params)]


def _encoder_gradient(mae: MaskedAutoencoderViT, encoder: dict[str, torch.Tensor], images: torch.Tensor, mask: Mask,
                      probs: torch.Tensor, norm: str, seed: int) -> list[torch.Tensor]:
    """dL_I/dE of a chunk at ``encoder`` (first order: fused attention kernels are fine)."""
    leaves = {n: e.detach().requires_grad_(True) for n, e in encoder.items()}
    with torch.enable_grad(), seeded(seed, images.device):
        loss = _stage1_loss(mae, leaves, images, mask, probs, norm)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [torch.zeros_like(e) if g is None else g for g, e in zip(grads, leaves.values())]


def _fd_hessian_product(mae: MaskedAutoencoderViT, encoder: dict[str, torch.Tensor], images: torch.Tensor,
                        mask: Mask, probs: torch.Tensor, direction: Sequence[torch.Tensor], alpha: float, seed: int,
                        norm: str) -> list[torch.Tensor]:
    """d2L_I/dE2 . direction at ``encoder`` by a central difference of gradients at E +- eps*direction."""
    d_norm = torch.sqrt(sum((d.float() ** 2).sum() for d in direction))
    if not torch.isfinite(d_norm) or d_norm == 0:
        return [torch.zeros_like(d) for d in direction]
    eps = alpha / d_norm.item()
    grads = [_encoder_gradient(mae, {n: e + (sign * eps) * d.to(e.dtype) for (n, e), d in
                                     zip(encoder.items(), direction)}, images, mask, probs, norm, seed)
             for sign in (1.0, -1.0)]
    return [(a - b) / (2.0 * eps) for a, b in zip(*grads)]


def exact_hypergradient(
    mae: MaskedAutoencoderViT,
    head: ClassificationHead,
    masknet: nn.Module,
    stage1_images: torch.Tensor,
    stage2_batch: tuple[torch.Tensor, torch.Tensor],
    stage3_batch: tuple[torch.Tensor, torch.Tensor],
    mask: Mask,
    lr_mae: float,
    lr_head: float,
    norm: str = "count",
    horizon: int = 1,
    probs: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """g_T = (d L_val(E_K, C'(E_K)) / dT) / eta_E through ``horizon`` virtual SGD steps of E, one per chunk of
    the Stage-I batch, and one of C. Double backward; uses the math attention kernel, the only one with a
    second derivative. ``lr_mae`` (eta_E) must be positive here (it is the virtual step).
    """
    e_params = dict(mae.encoder_named_parameters())
    c_params = dict(head.named_parameters())
    t_params = list(masknet.parameters())
    with sdpa_kernel(SDPBackend.MATH), head.frozen_statistics():
        if probs is None:
            probs = t_scores(mae, masknet, stage1_images)
        e_next = dict(e_params)
        for x, m, p in [(x, m, p) for (x, m), p in zip(_chunks(stage1_images, mask, horizon),
                                                          torch.tensor_split(probs, horizon))]:
            loss_i = _stage1_loss(mae, e_next, x, m, p, norm)
            grads_e = torch.autograd.grad(loss_i, list(e_next.values()), create_graph=True, allow_unused=True)
            e_next = {n: e if g is None else e - lr_mae * g for (n, e), g in zip(e_next.items(), grads_e)}

        stage2_features = functional_call(mae, e_next, (stage2_batch[0],))
        loss_ii = cross_entropy(functional_call(head, c_params, (stage2_features,)), stage2_batch[1])
        grads_c = torch.autograd.grad(loss_ii, list(c_params.values()), create_graph=True)
        c_next = {n: p - lr_head * g for (n, p), g in zip(c_params.items(), grads_c)}

        stage3_features = functional_call(mae, e_next, (stage3_batch[0],))
        loss_val = cross_entropy(functional_call(head, c_next, (stage3_features,)), stage3_batch[1])
        grads_t = torch.autograd.grad(loss_val, t_params)
    return [g / lr_mae for g in grads_t], loss_val.detach()
