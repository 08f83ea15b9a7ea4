"""Search spaces as YAML files: which config keys Ray Tune varies, and how.

A space file (see ``default.yaml``, ``cpu-smoke.yaml``)::

    description: free text (optional)
    space:                      # config key (as in -o KEY=VALUE): one distribution
      mlo.mask_ratio: {uniform: [0.5, 0.9]}        # float in [low, high]
      optim.lr_mask: {loguniform: [1.0e-5, 1.0e-3]} # float, log scale, low > 0
      mlo.unroll_mae: {randint: [1, 3]}             # integer in [low, high], both included
      mlo.unroll_head: {choice: [1, 2]}             # one of the values, at random
      mlo.baseline: {grid: [false, true]}           # every value, in every sample
    fixed:                      # config keys set the same for every trial (optional)
      run.max_steps: 60

The whole file is checked before anything starts: unknown keys (with a
suggestion), unknown distributions, bad ranges, values of the wrong type, and
values the config itself rejects (every bound and choice is resolved into a
config), each as one line naming the file and the key. Importing this module
does not import Ray; ``to_tune`` does.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlo_mae import config as config_mod
from mlo_mae.config import ConfigError, yaml_problem
from mlo_mae.errors import InputError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
TOP_LEVEL = ("description", "space", "fixed")
NOT_SEARCHABLE = ("preset", "data.dataset", "run.device", "run.precision")  # flags of the study, not of a trial
BUILT_IN = Path(__file__).resolve().parent


class SpaceError(InputError):
    """A bad search-space file; one line naming the file and the key."""


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # one of DISTRIBUTIONS
    args: tuple[Any, ...]  # (low, high) or the values


@dataclass
class SearchSpace:
    path: Path
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_tune(self) -> dict[str, Any]:
        """The ``param_space`` of a ``ray.tune.Tuner``: dotted key -> Tune domain."""
        from ray import tune

        make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                "randint": lambda a: tune.randint(a[0], a[1] + 1),  # Tune's upper bound is exclusive
                "choice": lambda a: tune.choice(list(a)), "grid": lambda a: tune.grid_search(list(a))}
        return {key: make[p.kind](p.args) for key, p in self.params.items()}

    @property
    def grid_size(self) -> int:
        """Trials per sample that the grid entries multiply out to."""
        size = 1
        for p in self.params.values():
            size *= len(p.args) if p.kind == "grid" else 1
        return size


def resolve_path(name: str | Path) -> Path:
    """A file path, or the name of a built-in space ('default', 'cpu-smoke')."""
    path = Path(name)
    if path.is_file():
        return path
    built_in = BUILT_IN / f"{name}.yaml"
    if built_in.is_file():
        return built_in
    names = ", ".join(sorted(p.stem for p in BUILT_IN.glob("*.yaml")))
    raise SpaceError(f"search space '{name}' is neither a file nor a built-in space ({names})")


def _key_types() -> dict[str, Any]:
    hints = typing.get_type_hints(config_mod.Config)
    out = {}
    for section, cls in hints.items():
        if section != "preset":
            out.update({f"{section}.{k}": t for k, t in typing.get_type_hints(cls).items()})
    return out


def _base_type(typ: Any) -> Any:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if args and typing.get_origin(typ) is not tuple else typ


def _check_key(key: Any, where: str, types: dict[str, Any]) -> None:
    if key in NOT_SEARCHABLE:
        raise SpaceError(f"{where}'{key}' is set for the whole study (a flag of 'mlo-mae tune'), not searched")
    if not isinstance(key, str) or key not in types:
        close = difflib.get_close_matches(str(key), list(types), n=1)
        raise SpaceError(f"{where}unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpaceError(f"{where}expected a number, got {value!r}")
    try:
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    except ValueError:
        raise SpaceError(f"{where}expected a number, got {value!r}") from None


def _param(key: str, spec: Any, where: str, types: dict[str, Any]) -> Param:
    where = f"{where}'{key}': "
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}expected one distribution, e.g. {{uniform: [low, high]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        raise SpaceError(f"{where}unknown distribution '{kind}'" + (f" (did you mean '{close[0]}'?)" if close
                                                                    else f" (one of {', '.join(DISTRIBUTIONS)})"))
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}{kind} expects a list, got {args!r}")
    typ = _base_type(types[key])
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2:
            raise SpaceError(f"{where}{kind} expects [low, high], got {args!r}")
        if kind == "randint":
            if typ is not int or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                raise SpaceError(f"{where}randint needs an integer key and integer bounds, got {args!r}")
            low, high = args
        else:
            if typ is not float:
                raise SpaceError(f"{where}{kind} needs a real-valued key; '{key}' takes {typ.__name__} "
                                 "(use choice or randint)")
            low, high = (_number(a, where) for a in args)
        if not low < high:
            raise SpaceError(f"{where}{kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}loguniform needs low > 0, got {low}")
        return Param(key, kind, (low, high))
    values = []
    for value in args:
        try:
            values.append(config_mod._coerce(key, value, types[key], ""))
        except ConfigError as err:
            raise SpaceError(f"{where}{kind}: {err}") from None
    return Param(key, kind, tuple(values))


def check_values(space: SearchSpace, base: config_mod.Config, where: str, problem: str = "is not allowed") -> None:
    """Every bound and every choice must make a valid config on ``base``."""
    for key, p in space.params.items():
        for value in p.args:
            try:
                config_mod.with_overrides(base, {key: value})
            except ConfigError as err:
                raise SpaceError(f"{where}'{key}': {p.kind} value {value!r} {problem}: {err}") from None


def _check_values(space: SearchSpace, where: str) -> None:
    """Checked on the defaults with the fixed keys (the study checks them again on its own base config)."""
    try:
        base = config_mod.resolve(overrides=space.fixed)
    except ConfigError as err:
        raise SpaceError(f"{where}fixed: {err}") from None
    check_values(space, base, where)


def load_space(name: str | Path) -> SearchSpace:
    """Read and check a space file (or built-in name); the first problem is a ``SpaceError``."""
    import yaml

    path = resolve_path(name)
    where = f"{path}: "
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{where}expected a mapping with 'space' (and optionally 'fixed', 'description')")
    for top in data:
        if top not in TOP_LEVEL:
            close = difflib.get_close_matches(str(top), TOP_LEVEL, n=1)
            raise SpaceError(f"{where}unknown top-level key '{top}'" + (f" (did you mean '{close[0]}'?)"
                                                                         if close else ""))
    raw_space, raw_fixed = data.get("space"), data.get("fixed") or {}
    if not isinstance(raw_space, dict) or not raw_space:
        raise SpaceError(f"{where}'space' must map at least one config key to a distribution")
    if not isinstance(raw_fixed, dict):
        raise SpaceError(f"{where}'fixed' must map config keys to values")
    types = _key_types()
    params = {}
    for key, spec in raw_space.items():
        _check_key(key, f"{where}space: ", types)
        params[key] = _param(key, spec, f"{where}space: ", types)
    for key in raw_fixed:
        _check_key(key, f"{where}fixed: ", types)
        if key in params:
            raise SpaceError(f"{where}'{key}' is both searched and fixed")
    space = SearchSpace(path=path, params=params, fixed=dict(raw_fixed), description=str(data.get("description", "")))
    _check_values(space, where)
    return space
