"""The hypergradient against independent references, on a tiny float64 model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlo_mae.engine import MLOEngine
from mlo_mae.factory import create_models
from mlo_mae.hypergradient import exact_hypergradient, hyper_direction, mixed_product_fd
from mlo_mae.masking import top_k_mask, weighted_reconstruction_loss

from conftest import level_streams, tiny_model

RATIO = 0.5
LR_E, LR_C = 0.05, 0.05  # large enough that the path through C matters


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a, b):
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


# Every way of weighting Stage I and every masking network: (mlo.stage1_norm, model.mask_net, model.mask_centre)
OPTIONS = [("count", "mlp", False), ("sum", "mlp", False), ("sum", "mlp", True), ("count", "patch", False),
           ("sum", "patch", False)]


@pytest.fixture(params=OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
def problem(request):
    norm, net, centre = request.param
    torch.manual_seed(0)
    cfg = tiny_model()
    cfg.mask_net, cfg.mask_centre = net, centre
    models = create_models(cfg, num_classes=3)
    for m in (models.mae, models.head, models.masknet):
        m.double().train()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=gen)) for _ in range(3)]
    if centre:  # a running mean that is not zero, so that centring takes part
        with torch.no_grad():
            models.masknet.track_input(models.mae.embed_patches(batches[1][0]).mean(0))
    models.norm = norm
    return models, batches


def sgd_unroll(models, batches):
    """E' and C' by one plain SGD step each, written out with ordinary autograd."""
    mae, head, masknet = models.mae, models.head, models.masknet
    (x1, _), (x2, y2), _ = batches
    with torch.no_grad():
        probs = masknet(mae.embed_patches(x1))
    mask = top_k_mask(probs, RATIO)
    loss = weighted_reconstruction_loss(mae(x1, mask.ids_keep, mask.ids_restore), mask.mask, probs, models.norm)
    enc = mae.encoder_named_parameters()
    grads = torch.autograd.grad(loss, [p for _, p in enc])
    mae_next = copy.deepcopy(mae)
    with torch.no_grad():
        for (name, _), g in zip(enc, grads):
            mae_next.get_parameter(name).sub_(LR_E * g)
    head_next = copy.deepcopy(head)
    with torch.no_grad(), head_next.frozen_statistics():
        feats = mae_next(x2)
    with head_next.frozen_statistics():
        loss_c = F.cross_entropy(head_next(feats), y2)
    grads_c = torch.autograd.grad(loss_c, list(head_next.parameters()))
    with torch.no_grad():
        for p, g in zip(head_next.parameters(), grads_c):
            p.sub_(LR_C * g)
    return mae_next, head_next


def total_derivative(mae, head, batches, lr_c=LR_C, through_c=True):
    """d L_val(E, C'(E)) / dE by double backward, C'(E) = C - lr_c * dL_II(E, C)/dC: the exact w at the
    encoder ``mae``. Without ``through_c``, C' is held fixed (only the path through E)."""
    _, (x2, y2), (x3, y3) = batches
    enc = [p for _, p in mae.encoder_named_parameters()]
    c = dict(head.named_parameters())
    with sdpa_kernel(SDPBackend.MATH), head.frozen_statistics():
        loss_c = F.cross_entropy(functional_call(head, c, (mae(x2),)), y2)
        grads_c = torch.autograd.grad(loss_c, list(c.values()), create_graph=through_c)
        c_next = {n: p - lr_c * (g if through_c else g.detach()) for (n, p), g in zip(c.items(), grads_c)}
        loss_val = F.cross_entropy(functional_call(head, c_next, (mae(x3),)), y3)
        grads = torch.autograd.grad(loss_val, enc, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, enc)]


def fd_through_unroll(models, batches, lr_c=LR_C, alpha=1e-4, through_c=True):
    """The fd-mode mixed product at E with the exact w at the unrolled E' (C' from C at E')."""
    x1 = batches[0][0]
    mae_next, _ = sgd_unroll(models, batches)
    w = total_derivative(mae_next, models.head, batches, lr_c, through_c)
    return mixed_product_fd(models.mae, models.masknet, x1, w, RATIO, alpha=alpha, norm=models.norm)


def exact(models, batches):
    (x1, _), b2, b3 = batches
    grads, _ = exact_hypergradient(models.mae, models.head, models.masknet, x1, b2, b3, RATIO, LR_E, LR_C,
                                   models.norm)
    return grads


def unrolled_val_loss(models, batches, t_params):
    """L_val(E'(T), C'(E'(T))) with T's parameters substituted: the brute-force reference."""
    mae, head, masknet = models.mae, models.head, models.masknet
    (x1, _), (x2, y2), (x3, y3) = batches
    enc = dict(mae.encoder_named_parameters())
    with sdpa_kernel(SDPBackend.MATH), head.frozen_statistics():
        probs = functional_call(masknet, t_params, (mae.embed_patches(x1).detach(),))
        mask = top_k_mask(probs, RATIO)
        loss = weighted_reconstruction_loss(mae(x1, mask.ids_keep, mask.ids_restore), mask.mask, probs, models.norm)
        grads = torch.autograd.grad(loss, list(enc.values()))
        e_next = {n: p - LR_E * g for (n, p), g in zip(enc.items(), grads)}
        c = dict(head.named_parameters())
        loss_c = F.cross_entropy(functional_call(head, c, (functional_call(mae, e_next, (x2,)),)), y2)
        grads_c = torch.autograd.grad(loss_c, list(c.values()))
        c_next = {n: p - LR_C * g for (n, p), g in zip(c.items(), grads_c)}
        logits = functional_call(head, c_next, (functional_call(mae, e_next, (x3,)),))
        return F.cross_entropy(logits, y3).detach()


def test_exact_mode_matches_brute_force_numerical_derivative(problem):
    models, batches = problem
    g = exact(models, batches)
    names = [n for n, _ in models.masknet.named_parameters()]
    base = {n: p.detach() for n, p in models.masknet.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    h = 1e-6
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in base.items()}
        plus = unrolled_val_loss(models, batches, {n: base[n] + h * direction[n] for n in names})
        minus = unrolled_val_loss(models, batches, {n: base[n] - h * direction[n] for n in names})
        numeric = float((plus - minus) / (2 * h))
        # g_T is dL_val/dT per unit of eta_E (see the module docstring)
        analytic = LR_E * float(sum((gi * direction[n]).sum() for gi, n in zip(g, names)))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-12)
        assert abs(analytic) > 1e-8  # the check is not 0 == 0


def test_finite_difference_agrees_with_exact_autograd_through_the_unrolled_step(problem):
    """Given the exact w at E', the one central difference is g_T to second order in eps."""
    models, batches = problem
    reference = exact(models, batches)
    fd = fd_through_unroll(models, batches, alpha=1e-4)
    assert 1 - cosine(fd, reference) < 1e-9
    assert flat(fd).norm() == pytest.approx(float(flat(reference).norm()), rel=1e-4)


def test_the_path_through_the_head_is_kept(problem):
    """Holding C' fixed in w (no -eta_C H u path) must move the estimate away from exact."""
    models, batches = problem
    reference = exact(models, batches)
    with_c = cosine(fd_through_unroll(models, batches), reference)
    without_c = cosine(fd_through_unroll(models, batches, through_c=False), reference)
    assert 1 - with_c < 1e-9 and 1 - without_c > 1e-2


def test_fd_converges_at_second_order_in_float64(problem):
    """A central difference: ten times smaller eps, about a hundred times smaller error."""
    models, batches = problem
    reference = flat(exact(models, batches))
    errors = [float((flat(fd_through_unroll(models, batches, alpha=a)) - reference).norm() / reference.norm())
              for a in (1e-2, 1e-3)]
    assert errors[0] < 0.1
    assert 50 < errors[0] / errors[1] < 200


def test_split_paths_give_the_same_direction_and_measure_each_path(problem):
    """hyper_direction(split=True): the same w, ||v|| = ||dL_val/dE|| and ||w - v|| the path through C."""
    models, batches = problem
    _, (x2, y2), (x3, y3) = batches
    both = models.mae(torch.cat([x2, x3]))
    joint = hyper_direction(models.mae, models.head, both[:6], y2, both[6:], y3, LR_C)
    both = models.mae(torch.cat([x2, x3]))
    split = hyper_direction(models.mae, models.head, both[:6], y2, both[6:], y3, LR_C, split=True)
    assert torch.allclose(flat(joint.w), flat(split.w), rtol=1e-10, atol=1e-14)
    v = total_derivative(models.mae, models.head, batches, lr_c=0.0)
    assert split.e_path_norm == pytest.approx(float(flat(v).norm()), rel=1e-10)
    assert split.c_path_norm == pytest.approx(float((flat(split.w) - flat(v)).norm()), rel=1e-8)
    assert split.c_path_norm > 0


def _engine_after_a_step(tiny_cfg, drop):
    tiny_cfg.model.drop_path = drop
    tiny_cfg.model.head_drop = drop
    tiny_cfg.mlo.mask_ratio = RATIO
    engine = MLOEngine(tiny_cfg, num_classes=3, total_steps=10)
    streams = level_streams()
    engine.step(streams)
    return engine, streams


def _snapshot(engine):
    return {f"{m}.{k}": v.clone() for m, mod in (("mae", engine.mae), ("head", engine.head),
                                                  ("masknet", engine.masknet))
            for k, v in mod.state_dict().items()}


def test_two_calls_agree_and_parameters_come_back_bit_for_bit(tiny_cfg):
    engine, streams = _engine_after_a_step(tiny_cfg, drop=0.2)  # dropout and drop-path active
    x1, b2, b3 = next(streams["mae"])[0], next(streams["head"]), next(streams["mask"])
    before = _snapshot(engine)
    rng = torch.get_rng_state()
    g1, _, _ = engine.hypergradient(x1, b2, b3)
    g2, _, _ = engine.hypergradient(x1, b2, b3)
    after = _snapshot(engine)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert flat(g1).norm() > 0
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG stream is not consumed


def test_plus_and_minus_passes_share_their_randomness(tiny_cfg):
    """With drop-path on, a shared mask makes the estimate independent of eps; a fresh mask
    per pass would add noise / eps and blow it up as eps shrinks."""
    engine, streams = _engine_after_a_step(tiny_cfg, drop=0.3)
    x1, b2, b3 = next(streams["mae"])[0], next(streams["head"]), next(streams["mask"])
    estimates = []
    for alpha in (1e-2, 1e-3):
        engine.cfg.mlo.fd_alpha = alpha
        estimates.append(engine.hypergradient(x1, b2, b3)[0])
    ratio = float(flat(estimates[1]).norm() / flat(estimates[0]).norm())
    assert cosine(*estimates) > 0.99
    assert 0.9 < ratio < 1.1
