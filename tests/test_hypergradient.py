"""The hypergradient against independent references, on a tiny float64 model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlo_mae.engine import MLOEngine
from mlo_mae.factory import create_models
from mlo_mae.hypergradient import exact_hypergradient, horizon_hypergradient, hyper_direction, mixed_product_fd
from mlo_mae.masking import select_mask, weighted_reconstruction_loss

from conftest import level_streams, tiny_model

RATIO = 0.5
LR_E, LR_C = 0.05, 0.05  # large enough that the path through C matters


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a, b):
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


# Every way of weighting Stage I, every masking network and every selection of the masked patches:
# (mlo.stage1_norm, model.mask_net, model.mask_centre, mlo.selection)
OPTIONS = [("count", "mlp", False, "topk"), ("sum", "mlp", False, "topk"), ("sum", "mlp", True, "topk"),
           ("count", "patch", False, "topk"), ("sum", "patch", False, "topk"), ("sum", "patch", False, "mixed"),
           ("count", "patch", False, "mixed"), ("sum", "patch", False, "gumbel"), ("sum", "mlp", False, "gumbel")]


# The horizon's tests, on one option of each kind (they cost K times more)
HORIZON_OPTIONS = [("count", "mlp", False, "topk"), ("sum", "patch", False, "topk"),
                   ("sum", "patch", False, "mixed"), ("sum", "patch", False, "gumbel")]


def make_problem(norm, net, centre, selection):
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
    with torch.no_grad():  # the Stage-I mask, drawn once (mixed and gumbel draw at random)
        probs = models.masknet(models.mae.embed_patches(batches[0][0]))
    models.mask = select_mask(probs, RATIO, selection, 0.5, torch.Generator().manual_seed(2))
    if selection == "mixed":  # both parts present: T's patches, weighted by p, and random ones, weighted 1
        assert 0 < models.mask.learned.sum() < models.mask.mask.sum()
    return models, batches


@pytest.fixture(params=OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
def problem(request):
    return make_problem(*request.param)


@pytest.fixture(params=[(o, k) for o in HORIZON_OPTIONS for k in (2, 4)],
                ids=lambda p: "-".join(str(v) for v in p[0]) + f"-K{p[1]}")
def horizon_problem(request):
    option, horizon = request.param
    return (*make_problem(*option), horizon)


def chunks(models, x1, horizon):
    """The Stage-I images, their mask and its parts, cut as the hypergradient cuts them."""
    m = models.mask
    cut = [torch.tensor_split(t, horizon) if t is not None else [None] * horizon
           for t in (x1, m.ids_keep, m.ids_restore, m.mask, m.learned)]
    return list(zip(*cut))


def sgd_unroll(models, batches, horizon=1):
    """E_K (one plain SGD step per chunk of the Stage-I batch, D fixed) and C' by one step, written out
    with ordinary autograd on deep copies."""
    mae, head, masknet = models.mae, models.head, models.masknet
    (x1, _), (x2, y2), _ = batches
    with torch.no_grad():
        probs = masknet(mae.embed_patches(x1))
    mae_next = copy.deepcopy(mae)
    for (x, keep, restore, mask, learned), p in zip(chunks(models, x1, horizon), torch.tensor_split(probs, horizon)):
        loss = weighted_reconstruction_loss(mae_next(x, keep, restore), mask, p, models.norm, learned)
        enc = mae_next.encoder_named_parameters()
        grads = torch.autograd.grad(loss, [q for _, q in enc])
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


def fd_through_unroll(models, batches, lr_c=LR_C, alpha=1e-4, through_c=True, horizon=1, lr_e=LR_E):
    """The fd mode with the exact w at the unrolled E_K (C' from C at E_K)."""
    x1 = batches[0][0]
    mae_next, _ = sgd_unroll(models, batches, horizon)
    w = total_derivative(mae_next, models.head, batches, lr_c, through_c)
    if horizon == 1:
        return mixed_product_fd(models.mae, models.masknet, x1, w, models.mask, alpha=alpha, norm=models.norm)
    return horizon_hypergradient(models.mae, models.masknet, x1, w, models.mask, lr_e, horizon, alpha=alpha,
                                 norm=models.norm)


def exact(models, batches, horizon=1):
    (x1, _), b2, b3 = batches
    grads, _ = exact_hypergradient(models.mae, models.head, models.masknet, x1, b2, b3, models.mask, LR_E, LR_C,
                                   models.norm, horizon)
    return grads


def unrolled_val_loss(models, batches, t_params, horizon=1):
    """L_val(E_K(T), C'(E_K(T))) with T's parameters substituted: the brute-force reference."""
    mae, head, masknet = models.mae, models.head, models.masknet
    (x1, _), (x2, y2), (x3, y3) = batches
    with sdpa_kernel(SDPBackend.MATH), head.frozen_statistics():
        probs = functional_call(masknet, t_params, (mae.embed_patches(x1).detach(),))
        e_next = dict(mae.encoder_named_parameters())
        for (x, keep, restore, mask, learned), p in zip(chunks(models, x1, horizon),
                                                         torch.tensor_split(probs, horizon)):
            errors = functional_call(mae, e_next, (x, keep, restore))
            loss = weighted_reconstruction_loss(errors, mask, p, models.norm, learned)
            grads = torch.autograd.grad(loss, list(e_next.values()))  # values only: no graph kept
            e_next = {n: q - LR_E * g for (n, q), g in zip(e_next.items(), grads)}
        c = dict(head.named_parameters())
        loss_c = F.cross_entropy(functional_call(head, c, (functional_call(mae, e_next, (x2,)),)), y2)
        grads_c = torch.autograd.grad(loss_c, list(c.values()))
        c_next = {n: p - LR_C * g for (n, p), g in zip(c.items(), grads_c)}
        logits = functional_call(head, c_next, (functional_call(mae, e_next, (x3,)),))
        return F.cross_entropy(logits, y3).detach()


def test_exact_mode_matches_brute_force_numerical_derivative(problem):
    check_exact_against_brute_force(*problem, horizon=1)


def test_exact_mode_through_a_horizon_matches_brute_force_numerical_derivative(horizon_problem):
    check_exact_against_brute_force(*horizon_problem)


def check_exact_against_brute_force(models, batches, horizon):
    g = exact(models, batches, horizon)
    names = [n for n, _ in models.masknet.named_parameters()]
    base = {n: p.detach() for n, p in models.masknet.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    h = 1e-6
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in base.items()}
        plus = unrolled_val_loss(models, batches, {n: base[n] + h * direction[n] for n in names}, horizon)
        minus = unrolled_val_loss(models, batches, {n: base[n] - h * direction[n] for n in names}, horizon)
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


def test_fd_through_a_horizon_agrees_with_exact_autograd(horizon_problem):
    """Given the exact w at E_K, the reverse accumulation (virtual iterates, Hessian-vector products and
    mixed products by central differences) is g_T through K steps to second order in eps."""
    models, batches, horizon = horizon_problem
    reference = exact(models, batches, horizon)
    fd = fd_through_unroll(models, batches, alpha=1e-4, horizon=horizon)
    assert 1 - cosine(fd, reference) < 1e-9
    assert flat(fd).norm() == pytest.approx(float(flat(reference).norm()), rel=1e-4)
    # The horizon matters here: one step (K = 1, the same images) is another direction, and so is the
    # sum of K mixed products without E's curvature (every lambda_j = w).
    assert 1 - cosine(exact(models, batches, 1), reference) > 1e-6
    curvature_free = fd_through_unroll(models, batches, alpha=1e-4, horizon=horizon, lr_e=0.0)
    assert 1 - cosine(curvature_free, reference) > 1e-6


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
