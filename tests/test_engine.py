import pytest
import torch

from mlo_mae.checkpoint import load, save_atomic
from mlo_mae.engine import MLOEngine, NonFiniteLossError

from conftest import level_streams


def _params(engine):
    return {f"{name}.{k}": v for name, mod in (("mae", engine.mae), ("head", engine.head),
                                               ("masknet", engine.masknet))
            for k, v in mod.state_dict().items()}


def _run(engine, streams, n):
    return [engine.step(streams) for _ in range(n)]


@pytest.mark.parametrize("baseline", [False, True])
def test_save_load_continue_is_bit_for_bit(tiny_cfg, tmp_path, baseline):
    tiny_cfg.mlo.baseline = baseline
    tiny_cfg.model.drop_path = 0.1  # exercise the RNG state too
    tiny_cfg.model.head_drop = 0.1
    k = 3
    straight = MLOEngine(tiny_cfg, 3, total_steps=2 * k)
    _run(straight, level_streams(), 2 * k)

    first = MLOEngine(tiny_cfg, 3, total_steps=2 * k)
    _run(first, level_streams(), k)
    # The data position: batches drawn per level (iteration x batches per iteration).
    drawn = {level: first.batches_drawn(level) for level in first.level_steps}
    path = save_atomic({"engine": first.state_dict(), "drawn": drawn}, tmp_path / "ckpt.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    del first

    state = load(path)  # weights_only=True
    torch.manual_seed(12345)  # a fresh process would not share the RNG position
    resumed = MLOEngine.from_state_dict(state["engine"])
    _run(resumed, level_streams(start=state["drawn"]), k)

    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed.iteration == straight.iteration == 2 * k
    assert resumed.level_steps == straight.level_steps
    for level in straight.optimizers:
        sa = straight.optimizers[level].state_dict()["state"]
        sb = resumed.optimizers[level].state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            assert all(torch.equal(sa[i][n], sb[i][n]) for n in ("exp_avg", "exp_avg_sq"))


def test_baseline_never_touches_the_masking_network(tiny_cfg):
    tiny_cfg.mlo.baseline = True
    engine = MLOEngine(tiny_cfg, 3, total_steps=4)
    before = {k: v.clone() for k, v in engine.masknet.state_dict().items()}
    before_mae = engine.mae.patch_embed.proj.weight.clone()
    stats = _run(engine, level_streams(), 4)
    after = engine.masknet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.optimizers["mask"].state_dict()["state"] == {}
    assert engine.level_steps == {"mae": 8, "head": 4 * tiny_cfg.mlo.unroll_head, "mask": 0}
    assert all(s.loss_val is None for s in stats)
    assert not torch.equal(before_mae, engine.mae.patch_embed.proj.weight)  # E did train


def test_mlo_mode_trains_every_level(tiny_cfg):
    engine = MLOEngine(tiny_cfg, 3, total_steps=3)
    before = {n: p.clone() for n, p in engine.masknet.named_parameters()}
    stats = _run(engine, level_streams(), 3)
    assert engine.level_steps == {"mae": 6, "head": 3 * tiny_cfg.mlo.unroll_head, "mask": 3}
    assert any(not torch.equal(before[n], p) for n, p in engine.masknet.named_parameters())
    assert all(s.loss_val is not None and s.hypergrad_norm > 0 for s in stats)


def test_per_level_unroll_counts_are_honoured(tiny_cfg):
    tiny_cfg.mlo.unroll_mae, tiny_cfg.mlo.unroll_head, tiny_cfg.mlo.unroll_mask = 3, 2, 2
    engine = MLOEngine(tiny_cfg, 3, total_steps=2)
    _run(engine, level_streams(), 2)
    assert engine.level_steps == {"mae": 6, "head": 4, "mask": 4}


@pytest.mark.parametrize("final_fraction", [0.0, 0.1])
def test_every_level_reaches_its_floor_at_the_last_step(tiny_cfg, final_fraction):
    tiny_cfg.optim.final_lr_fraction = final_fraction
    tiny_cfg.optim.warmup_fraction = 0.2
    tiny_cfg.optim.schedule_head = "cosine"  # (the constant one is checked below)
    total = 5
    engine = MLOEngine(tiny_cfg, 3, total_steps=total)
    seen = {level: [] for level in engine.optimizers}
    streams = level_streams()
    for _ in range(total):
        engine.step(streams)
        for level, opt in engine.optimizers.items():
            seen[level].append(opt.param_groups[0]["lr"])
    for level, lrs in seen.items():
        base = engine.base_lr[level]
        assert lrs[-1] == pytest.approx(base * final_fraction, abs=1e-12)
        assert max(lrs) <= base * (1 + 1e-12)
        # and the schedule spans every step of the level: its peak is reached
        full = [engine.lr(level, s) for s in range(engine.level_total(level))]
        assert max(full) == pytest.approx(base)
        assert full[-1] == pytest.approx(base * final_fraction, abs=1e-12)
        assert all(a >= b for a, b in zip(full[full.index(max(full)):], full[full.index(max(full)) + 1:]))


def test_optimisers_are_adamw_without_decay_on_biases_norms_and_tokens(tiny_cfg):
    engine = MLOEngine(tiny_cfg, 3, total_steps=1)
    opt = engine.optimizers["mae"]
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in engine.mae.named_parameters()}
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.95)
        for p in group["params"]:
            n = names[id(p)]
            undecayed = p.ndim <= 1 or n.endswith(".bias") or n in ("cls_token", "mask_token")
            assert group["weight_decay"] == (0.0 if undecayed else tiny_cfg.optim.weight_decay_mae), n
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(engine.mae.parameters()))


def test_nan_loss_names_the_level_and_step(tiny_cfg):
    engine = MLOEngine(tiny_cfg, 3, total_steps=3)
    streams = level_streams()
    engine.step(streams)
    bad = level_streams()
    bad["mae"] = iter([(torch.full((6, 3, 8, 8), float("nan")), torch.zeros(6, dtype=torch.long))] * 4)
    with pytest.raises(NonFiniteLossError, match="Stage-I.*iteration 2"):  # the second, as the progress counts
        engine.step(bad)


def test_exact_mode_runs_inside_the_engine(tiny_cfg):
    tiny_cfg.mlo.hypergradient = "exact"
    engine = MLOEngine(tiny_cfg, 3, total_steps=2)
    stats = _run(engine, level_streams(), 2)
    assert all(s.hypergrad_norm > 0 for s in stats)


def test_sync_hook_sees_every_gradient_before_it_is_used(tiny_cfg):
    """The data-parallel hook: u, w and each level's loss + gradients pass through ``sync``
    (in this order within an iteration), so ranks can average them in place."""
    calls = []

    def record(tensors):
        calls.append([tuple(t.shape) for t in tensors])

    engine = MLOEngine(tiny_cfg, 3, total_steps=1, sync=record)
    engine.step(level_streams())
    loss = [(1,)]
    shapes = {
        "mae": loss + [tuple(p.shape) for p in engine.mae.parameters()],
        "head": loss + [tuple(p.shape) for p in engine.head.parameters()] + [(engine.head.norm.num_features,)] * 2,
        "u": [tuple(p.shape) for p in engine.head.parameters()],
        "w": [tuple(p.shape) for _, p in engine.mae.encoder_named_parameters()],
        "mask": loss + [tuple(p.shape) for p in engine.masknet.parameters()],
    }
    heads = [shapes["head"]] * tiny_cfg.mlo.unroll_head
    assert calls == [shapes["mae"], shapes["mae"], *heads, shapes["u"], shapes["w"], shapes["mask"]]


def test_sync_hook_changes_the_direction_used_for_the_perturbation(tiny_cfg):
    """Averaging with a rank that saw nothing (halving u and w) must change g_T."""
    engine = MLOEngine(tiny_cfg, 3, total_steps=4)
    streams = level_streams()
    engine.step(streams)
    x1, b2, b3 = next(streams["mae"])[0], next(streams["head"]), next(streams["mask"])
    alone = engine.hypergradient(x1, b2, b3)[0]

    def halve(tensors):
        for t in tensors:
            t.mul_(0.5)

    engine.sync = halve
    averaged = engine.hypergradient(x1, b2, b3)[0]
    assert not all(torch.allclose(a, b) for a, b in zip(alone, averaged))


def test_constant_head_schedule_holds_its_lr_after_warmup(tiny_cfg):
    tiny_cfg.optim.warmup_fraction = 0.2
    tiny_cfg.optim.schedule_head = "constant"
    tiny_cfg.mlo.unroll_head = 1
    engine = MLOEngine(tiny_cfg, 3, total_steps=10)
    lrs = [engine.lr("head", s) for s in range(engine.level_total("head"))]
    base = engine.base_lr["head"]
    assert lrs[:2] == pytest.approx([base / 2, base])  # the same warmup as every level
    assert lrs[2:] == pytest.approx([base] * 8)
    assert engine.lr("mae", engine.level_total("mae") - 1) == pytest.approx(0.0)  # the others still decay


@pytest.mark.parametrize("norm", ["count", "sum"])
def test_stage_one_minimises_the_configured_weighting(tiny_cfg, norm):
    from mlo_mae.masking import top_k_mask, weighted_reconstruction_loss

    tiny_cfg.mlo.stage1_norm = norm
    engine = MLOEngine(tiny_cfg, 3, total_steps=2)
    images = next(level_streams()["mae"])[0]
    with torch.no_grad():
        probs = engine.masknet(engine.mae.embed_patches(images))
        mask = top_k_mask(probs, tiny_cfg.mlo.mask_ratio)
        errors = engine.mae(images, mask.ids_keep, mask.ids_restore)
    expected = weighted_reconstruction_loss(errors, mask.mask, probs, norm)
    loss, masking = engine.mae_step(images)
    assert loss == pytest.approx(float(expected), rel=1e-6)
    assert masking["mask_mean_prob_masked"] == pytest.approx(float((probs * mask.mask).sum() / mask.mask.sum()))


@pytest.mark.parametrize("net,centre", [("patch", False), ("mlp", True)])
def test_masking_network_options_build_and_train(tiny_cfg, net, centre):
    from mlo_mae.masking import MaskingNetwork, PatchScorer

    tiny_cfg.model.mask_net, tiny_cfg.model.mask_centre = net, centre
    engine = MLOEngine(tiny_cfg, 3, total_steps=3)
    assert isinstance(engine.masknet, PatchScorer if net == "patch" else MaskingNetwork)
    before = {n: p.clone() for n, p in engine.masknet.named_parameters()}
    _run(engine, level_streams(), 3)
    assert any(not torch.equal(before[n], p) for n, p in engine.masknet.named_parameters())
    if centre:  # the running mean saw every Stage-I batch's T input
        assert int(engine.masknet.input_count) == 3 * tiny_cfg.mlo.unroll_mae
        assert engine.masknet.input_mean.abs().sum() > 0


def test_paths_are_measured_on_logged_steps_only(tiny_cfg):
    tiny_cfg.run.log_every = 2
    engine = MLOEngine(tiny_cfg, 3, total_steps=6)  # (at the last step the cosine takes C's lr, so the path, to 0)
    stats = _run(engine, level_streams(), 4)
    ratios = [s.path_ratio for s in stats]
    assert ratios[0] is None and ratios[2] is None
    assert ratios[1] > 0 and ratios[3] > 0  # iterations 2 and 4: the steps the worker logs
    assert all(s.mask_saturated is not None and 0 < s.mask_mean_prob_masked < 1 for s in stats)


def test_frozen_mask_network_is_bit_identical_and_still_masks(tiny_cfg):
    """optim.lr_mask 0: T stays at its initialisation (no Stage III, no optimiser state), Stage I is
    still weighted by T's scores."""
    tiny_cfg.optim.lr_mask = 0.0
    engine = MLOEngine(tiny_cfg, 3, total_steps=4)
    before = {k: v.clone() for k, v in engine.masknet.state_dict().items()}
    stats = _run(engine, level_streams(), 4)
    assert all(torch.equal(before[k], v) for k, v in engine.masknet.state_dict().items())
    assert engine.optimizers["mask"].state_dict()["state"] == {}
    assert engine.level_steps["mask"] == 0 and all(s.loss_val is None for s in stats)
    assert all(s.mask_mean_prob_masked is not None for s in stats)  # T's scores weigh Stage I
    # the same run with T learning has another T at the end
    tiny_cfg.optim.lr_mask = 1e-3
    learning = MLOEngine(tiny_cfg, 3, total_steps=4)
    _run(learning, level_streams(), 4)
    assert any(not torch.equal(before[k], v) for k, v in learning.masknet.state_dict().items())


@pytest.mark.parametrize("rule", ["object-first", "background-first"])
def test_pixel_rule_runs_at_mae_cost_and_masks_by_the_rule(tiny_cfg, rule):
    from mlo_mae.masking import patch_statistic

    tiny_cfg.mlo.baseline, tiny_cfg.mlo.baseline_rule = True, rule
    engine = MLOEngine(tiny_cfg, 3, total_steps=2)
    _run(engine, level_streams(), 2)
    assert engine.level_steps["mask"] == 0
    images = next(level_streams()["mae"])[0]
    probs, mask = engine.choose_mask(images)
    stat = patch_statistic(engine.mae.patchify(images))
    k = int(mask.mask[0].sum())
    chosen = torch.topk(stat if rule == "object-first" else -stat, k).indices
    assert probs is None and torch.equal(mask.mask, torch.zeros_like(stat).scatter_(1, chosen, 1.0))


def test_mixed_share_ramps_from_zero_to_the_learned_fraction(tiny_cfg):
    tiny_cfg.mlo.selection, tiny_cfg.mlo.learned_fraction = "mixed", 0.5
    engine = MLOEngine(tiny_cfg, 3, total_steps=5)
    images = next(level_streams()["mae"])[0]
    shares = []
    for it in range(5):
        engine.iteration = it
        shares.append(float(engine.choose_mask(images)[1].learned.sum(1).mean()))
    assert shares[0] == 0 and shares[-1] == 6.0  # k = 12 of 16: 6 chosen by T at the end
    assert shares == sorted(shares)
    engine.iteration = 0
    _run(engine, level_streams(), 5)  # and the engine trains with it
    assert engine.level_steps["mask"] == 5


@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_a_longer_horizon_runs_inside_the_engine_and_changes_the_hypergradient(tiny_cfg, mode):
    tiny_cfg.mlo.hypergradient = mode
    tiny_cfg.optim.lr_mae = 0.5  # virtual steps long enough for E's curvature to show
    grads = {}
    for horizon in (1, 2):
        tiny_cfg.mlo.horizon = horizon
        engine = MLOEngine(tiny_cfg, 3, total_steps=4)
        streams = level_streams()
        engine.step(streams)
        batch = next(streams["mae"])[0], next(streams["head"]), next(streams["mask"])
        grads[horizon] = torch.cat([g.flatten() for g in engine.hypergradient(*batch)[0]])
    assert grads[2].norm() > 0
    assert float(torch.nn.functional.cosine_similarity(grads[1], grads[2], dim=0)) < 1 - 1e-6


def test_head_reuse_draws_one_stage_two_batch_and_keeps_its_features(tiny_cfg):
    """C takes unroll_head steps per iteration; one is on a fresh D_tr batch, the others on the CLS
    features the previous iterations' batches had when they were encoded."""
    tiny_cfg.mlo.unroll_head = 3
    engine = MLOEngine(tiny_cfg, 3, total_steps=5)
    streams = level_streams()
    drawn = []
    head_stream = streams["head"]

    def counting():
        for batch in head_stream:
            drawn.append(batch)
            yield batch

    streams["head"] = counting()
    encoded = []
    for _ in range(3):
        engine.step(streams)
        with torch.no_grad():  # E does not move after Stage I: the fresh batch's features as they were encoded
            encoded.append(engine.mae.forward_features(drawn[-1][0])[:, :1])
    assert len(drawn) == 3 and engine.level_steps["head"] == 9 and engine.batches_drawn("head") == 3
    assert len(engine.head_queue) == 2  # the last two batches, kept as they were encoded (not re-encoded)
    for (features, labels), batch, then in zip(engine.head_queue, drawn[1:], encoded[1:]):
        assert torch.equal(labels, batch[1]) and torch.allclose(features, then, atol=1e-6)
    with torch.no_grad():
        now = engine.mae.forward_features(drawn[1][0])[:, :1]
    assert not torch.allclose(engine.head_queue[0][0], now, atol=1e-4)  # E has moved on since
    tiny_cfg.mlo.head_reuse = False  # every step encodes a fresh batch
    fresh = MLOEngine(tiny_cfg, 3, total_steps=5)
    assert fresh.batches_per_iteration("head") == 3 and fresh.head_queue == []


def test_a_checkpoint_keeps_every_rank_s_reused_features_and_each_rank_takes_its_own(tiny_cfg):
    """Each data-parallel rank keeps the features of its own Stage-II batches: the checkpoint holds all of
    them (gathered by the worker), and a restored rank continues with its own, not rank 0's."""
    engines = [MLOEngine(tiny_cfg, 3, total_steps=4, rank=r, world_size=2) for r in range(2)]
    for r, engine in enumerate(engines):
        _run(engine, level_streams(seed=r), 2)
    queues = [engine.head_queue_state() for engine in engines]
    assert not torch.equal(queues[0][0][0], queues[1][0][0])
    state = engines[0].state_dict(queues)
    restored = MLOEngine(tiny_cfg, 3, total_steps=4, rank=1, world_size=2)
    restored.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(restored.head_queue_state(), queues[1]))
