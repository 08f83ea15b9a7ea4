import pytest

from mlo_mae.config import Config, ConfigError, PRESETS, describe_masking, from_dict, parse_override, resolve


def test_defaults_preset_file_and_overrides_apply_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: small\nmodel:\n  depth: 6\noptim:\n  lr_mask: 1e-4\n")
    cfg = resolve(f, overrides={"model.depth": 3, "mlo.unroll_mae": 4})
    assert cfg.preset == "small"
    assert cfg.model.embed_dim == PRESETS["small"]["model"]["embed_dim"]  # from the preset
    assert cfg.optim.lr_mask == 1e-4  # from the file, '1e-4' read as a number
    assert cfg.model.depth == 3  # command line beats the file
    assert cfg.mlo.unroll_mae == 4
    assert resolve(f, preset="tiny").model.embed_dim == 192  # --preset beats the file's preset


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = resolve(preset="base-cifar", overrides={"mlo.mask_ratio": 0.6, "optim.betas": [0.8, 0.9]})
    f = tmp_path / "resolved.yaml"
    f.write_text(cfg.to_yaml())
    again = resolve(f)
    assert again == cfg
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides,needle", [
    ({"optim.lr_maee": 1.0}, "unknown config key 'optim.lr_maee' (did you mean 'optim.lr_mae'?)"),
    ({"mlo.mask_ratio": 1.5}, "'mlo.mask_ratio' must be between 0 and 1"),
    ({"mlo.unroll_mae": 0}, "'mlo.unroll_mae' must be positive"),
    ({"mlo.unroll_mae": 1.5}, "'mlo.unroll_mae' expects an integer"),
    ({"mlo.hypergradient": "neumann"}, "'mlo.hypergradient' must be one of fd, exact"),
    ({"model.patch_size": 5}, "must be a multiple of 'model.patch_size'"),
    ({"run.precision": "fp16"}, "'run.precision' must be one of fp32, bf16"),
    ({"data.batch_mask": 1}, "'data.batch_mask' must be at least 2"),
    ({"optim.betas": [0.9]}, "'optim.betas' expects a list of 2 numbers"),
])
def test_bad_values_are_named(overrides, needle):
    with pytest.raises(ConfigError) as err:
        resolve(overrides=overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("mlo:\n  mask_ration: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'mlo.mask_ration'"):
        resolve(f)
    f.write_text("mlo: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: the '\[' at line 1, column 6 is not closed"):
        resolve(f)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve(preset="huge")


def test_override_parsing():
    assert parse_override("optim.lr_mae=3e-4") == ("optim.lr_mae", "3e-4")
    assert parse_override("mlo.baseline=true") == ("mlo.baseline", True)
    assert parse_override("run.max_steps=null") == ("run.max_steps", None)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr_mae")
    assert isinstance(Config().to_dict()["optim"]["betas"], list)


def test_paper_recipe_is_a_named_config_over_any_preset():
    paper = resolve("paper", preset="base-cifar")
    assert paper.model.embed_dim == 768 and paper.model.patch_size == 2  # the preset's model
    assert (paper.model.mask_net, paper.model.mask_centre, paper.mlo.stage1_norm) == ("mlp", False, "count")
    assert (paper.mlo.unroll_head, paper.optim.lr_head, paper.optim.schedule_head) == (1, 1e-3, "cosine")
    assert paper.optim.lr_mask == 4e-5 and paper.data.augment_head is True
    default = resolve()
    assert (default.model.mask_net, default.mlo.stage1_norm, default.mlo.unroll_head) == ("patch", "sum", 4)
    with pytest.raises(ConfigError, match=r"config file 'papr' does not exist \(built-in recipes: paper\)"):
        resolve("papr")


def test_runs_saved_before_a_key_existed_keep_what_they_did():
    saved = resolve().to_dict()
    for section, key in (("model", "mask_net"), ("model", "mask_centre"), ("mlo", "stage1_norm"),
                         ("optim", "schedule_head"), ("data", "augment_head")):
        del saved[section][key]
    old = from_dict(saved)
    assert (old.model.mask_net, old.mlo.stage1_norm, old.optim.schedule_head) == ("mlp", "count", "cosine")
    assert old.data.augment_head is True and old.model.mask_centre is False
    assert from_dict(resolve().to_dict()) == resolve()  # a run saved with the keys keeps its own values


def test_centring_applies_to_the_paper_masking_network_only():
    assert resolve(overrides={"model.mask_net": "mlp", "model.mask_centre": True}).model.mask_centre
    with pytest.raises(ConfigError, match="'model.mask_centre' applies to 'model.mask_net' mlp only"):
        resolve(overrides={"model.mask_centre": True})


def test_reference_arms_and_remedies_are_config_values():
    cfg = resolve(overrides={"optim.lr_mask": 0})
    assert cfg.optim.lr_mask == 0.0 and "T frozen" in describe_masking(cfg)
    cfg = resolve(overrides={"mlo.baseline": True, "mlo.baseline_rule": "object-first"})
    assert describe_masking(cfg) == "baseline MAE (object-first masks)"
    cfg = resolve(overrides={"mlo.selection": "mixed", "mlo.horizon": 4})
    assert describe_masking(cfg) == "MLO-MAE (fd hypergradient, mixed selection up to 0.5 learned, horizon 4)"


@pytest.mark.parametrize("overrides,message", [
    ({"optim.lr_mask": -1e-3}, "'optim.lr_mask' must be positive, or 0"),
    ({"mlo.baseline_rule": "object-first"}, "applies to baseline runs"),
    ({"mlo.baseline": True, "mlo.selection": "gumbel"}, "baseline runs have none"),
    ({"mlo.baseline_rule": "edges"}, "'mlo.baseline_rule' must be one of random, background-first, object-first"),
    ({"mlo.selection": "best"}, "'mlo.selection' must be one of topk, mixed, gumbel"),
    ({"mlo.learned_fraction": 1.5}, "'mlo.learned_fraction' must be in [0, 1]"),
    ({"mlo.horizon": 0}, "'mlo.horizon' must be positive"),
    ({"mlo.horizon": 64, "data.batch_mae": 32}, "at most 'data.batch_mae' (32)"),
])
def test_bad_masking_options_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve(overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value,message", [
    ("max", "'run.probe_features' must be cls, mean or tokens"), ("mean+mean", "joined by '+'"),
    ("tokens", "would read 196,608 features per image"),  # base-cifar: 256 patches x 768
])
def test_probe_features_are_checked(value, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        resolve(preset="base-cifar", overrides={"run.probe_features": value})
    assert resolve(overrides={"run.probe_features": "tokens+mean+cls"}).run.probe_features == "tokens+mean+cls"
