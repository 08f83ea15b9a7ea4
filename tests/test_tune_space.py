"""Search-space files: the built-in ones load; every kind of mistake is one line naming file and key."""

from __future__ import annotations

import pytest

from tune_spaces.space import SpaceError, load_space


@pytest.mark.parametrize("name", ["default", "cpu-smoke"])
def test_built_in_spaces_load_and_sample_in_range(name):
    space = load_space(name)
    assert "optim.lr_mask" in space.params and space.grid_size == 1
    domains = space.to_tune()
    for key, p in space.params.items():
        for _ in range(20):
            value = domains[key].sample()
            if p.kind in ("uniform", "loguniform", "randint"):
                assert p.args[0] <= value <= p.args[1], (key, value)
            else:
                assert value in p.args


def test_randint_includes_its_upper_bound(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("space:\n  mlo.unroll_mae: {randint: [1, 2]}\n")
    domain = load_space(f).to_tune()["mlo.unroll_mae"]
    assert {domain.sample() for _ in range(200)} == {1, 2}


def test_grid_multiplies_out(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("space:\n  mlo.baseline: {grid: [false, true]}\n  mlo.unroll_head: {grid: [1, 2, 3]}\n")
    space = load_space(f)
    assert space.grid_size == 6 and space.to_tune()["mlo.baseline"] == {"grid_search": [False, True]}


@pytest.mark.parametrize("text,needle", [
    ("space:\n  optim.lr_maks: {loguniform: [1.0e-5, 1.0e-3]}\n",
     "space: unknown config key 'optim.lr_maks' (did you mean 'optim.lr_mask'?)"),
    ("space:\n  optim.lr_mask: {logunifrom: [1.0e-5, 1.0e-3]}\n",
     "'optim.lr_mask': unknown distribution 'logunifrom' (did you mean 'loguniform'?)"),
    ("space:\n  optim.lr_mask: {loguniform: [1.0e-3, 1.0e-5]}\n", "loguniform needs low < high"),
    ("space:\n  optim.lr_mask: {loguniform: [0, 1.0e-3]}\n", "loguniform needs low > 0"),
    ("space:\n  optim.lr_mask: {uniform: [1.0e-5]}\n", "uniform expects [low, high]"),
    ("space:\n  mlo.unroll_mae: {uniform: [1, 3]}\n", "needs a real-valued key; 'mlo.unroll_mae' takes int"),
    ("space:\n  mlo.unroll_mae: {choice: [1, two]}\n", "'mlo.unroll_mae' expects an integer, got 'two'"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 1.2]}\n",
     "'mlo.mask_ratio': uniform value 1.2 is not allowed: 'mlo.mask_ratio' must be between 0 and 1"),
    ("space:\n  mlo.hypergradient: {choice: [fd, exct]}\n", "'mlo.hypergradient'"),
    ("space:\n  preset: {choice: [tiny, small]}\n", "'preset' is set for the whole study"),
    ("space:\n  mlo.mask_ratio: 0.7\n", "expected one distribution"),
    ("spaces:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\n", "unknown top-level key 'spaces' (did you mean 'space'?)"),
    ("space: {}\n", "'space' must map at least one config key"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\nfixed:\n  mlo.mask_ratio: 0.6\n", "both searched and fixed"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\nfixed:\n  run.max_step: 5\n",
     "fixed: unknown config key 'run.max_step'"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]\n", "not valid YAML: the '{' at line 2, column 19 is not closed"),
])
def test_bad_space_is_one_line_naming_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(f)
    message = str(err.value)
    assert message.startswith(str(f)) and needle in message and "\n" not in message, message


def test_unknown_space_name_lists_the_built_in_ones():
    with pytest.raises(SpaceError, match=r"neither a file nor a built-in space \(cpu-smoke, default\)"):
        load_space("defualt")
