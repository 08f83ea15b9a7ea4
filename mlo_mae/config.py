"""One typed configuration for a whole MLO-MAE run.

Resolution order, later wins: dataclass defaults < preset < YAML file < command
line. The resolved config is plain data (``to_dict``) so that it can be printed,
saved next to checkpoints and loaded again unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import InputError


class ConfigError(InputError):
    """A bad config file, key or value; the message is one line meant for the user."""


@dataclass
class ModelConfig:
    """Architecture of E (encoder), D (decoder), C (head) and T (masking network)."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mask_hidden_dim: int = 512
    # T: patch (one small scorer shared by every patch, logits standardised within the image) | mlp (the
    # paper's, over the whole flattened image; its masks were measured to collapse to one spatial pattern)
    mask_net: str = "patch"
    mask_centre: bool = False  # mlp only: centre T's input per position and channel by a running mean
    drop_path: float = 0.0
    head_drop: float = 0.0


@dataclass
class MLOConfig:
    """The three-level method: masking, hypergradient and per-level unroll counts."""

    baseline: bool = False  # no T and no Stage III: plain MAE (masks by baseline_rule)
    # baseline runs only: random (MAE) | object-first | background-first (the patches of highest / lowest
    # pixel standard deviation, ties at random): reference arms at MAE's cost
    baseline_rule: str = "random"
    mask_ratio: float = 0.75
    # how T's scores choose the masked patches: topk (the paper) | gumbel (Gumbel-top-k: drawn in
    # proportion to p) | mixed (HPM-style: T's highest for a share ramped from 0 to learned_fraction,
    # the rest uniformly random and weighted 1 in Stage I)
    selection: str = "topk"
    learned_fraction: float = 0.5  # mixed: the share of the masked patches T chooses at the end of the run
    hypergradient: str = "fd"  # fd: one central finite difference; exact: double backward
    fd_alpha: float = 0.01  # eps = fd_alpha / ||w||
    # Stage-I steps of E's response the hypergradient looks through: the last Stage-I batch in this many
    # chunks, one virtual SGD step each (1: the paper's one step)
    horizon: int = 1
    # Stage I's weights: sum: per image sum(p*err)/sum(p) over masked patches, T only moves weight between
    # patches; count: sum(p*err)/K (the authors'), T can shrink Stage I by lowering every p
    stage1_norm: str = "sum"
    unroll_mae: int = 2  # Stage-I (E, D) steps per iteration
    unroll_head: int = 4  # Stage-II (C) steps per iteration (the authors': 1)
    # true: one fresh D_tr batch per iteration (encoded by the pass Stage III shares); C's other steps reuse
    # the CLS features of the previous iterations' batches, kept from when they were encoded.
    # false: every C step encodes a fresh batch (one more encoder pass each)
    head_reuse: bool = True
    unroll_mask: int = 1  # Stage-III (T) steps per iteration


@dataclass
class OptimConfig:
    """AdamW for every level; warmup + cosine that ends at the real end of training."""

    lr_mae: float = 1e-4
    lr_head: float = 1e-2  # C: a linear head on normalised features, chasing a moving encoder
    lr_mask: float = 1e-3  # 0: T stays at its initialisation (no Stage III)
    weight_decay_mae: float = 0.05
    weight_decay_head: float = 0.0
    weight_decay_mask: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.0
    # C chases a moving encoder: a constant lr (after warmup) keeps it tracking E to the end (cosine: the authors')
    schedule_head: str = "constant"
    # The lrs above are for one worker's batch; with N workers (global batch N x batch) they are
    # multiplied by N (linear, the MAE/Goyal et al. rule), sqrt(N), or left as they are (none).
    lr_scaling: str = "linear"


@dataclass
class DataConfig:
    """Where the images come from and how each level batches them."""

    dataset: str = "digits"  # 'digits' (built in) or a folder written by 'mlo-mae prepare'
    augment: str = "auto"  # rrc | pad-crop | none; auto: rrc from 96 px up, else pad-crop
    batch_mae: int = 32  # Stage I batch (D_tr)
    batch_head: int = 32  # Stage II batch (D_tr)
    batch_mask: int = 32  # Stage III batch (D_val)
    augment_head: bool = False  # Stage II reads D_tr as evaluated (true: with Stage I's crop + flip, the authors')


@dataclass
class RunConfig:
    max_steps: int | None = None  # iterations; None: derived from epochs
    epochs: float = 10.0  # passes of Stage I over D_tr
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 10
    threads: int = 0  # torch threads per training worker; 0: this machine's cores / workers
    checkpoint_every: int = 50  # iterations between checkpoints (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # the last K checkpoints are kept
    max_failures: int = 2  # restarts from the last checkpoint after a worker dies; -1: no limit
    eval_every: int = 25  # iterations between evaluations on a fixed D_val sample (+ heatmaps); 0: only at the end
    eval_samples: int = 512  # size of that fixed D_val sample
    probe: bool = True  # linear probe on the test split at the end
    # what the linear probe reads: cls (the CLS token, as MAE) | mean (of the patch tokens) | tokens (the patch
    # tokens' whole map, flattened: N*d features); several joined by '+' (the first is the run's probe/*)
    probe_features: str = "cls"


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    mlo: MLOConfig = field(default_factory=MLOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Presets are recipes: they may set any section, not only the architecture.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The CPU preset (and the benchmark's comparison model): 64 patches of 4x4.
    "tiny": {
        "model": dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
        "optim": dict(lr_mae=3e-4, weight_decay_mae=0.05),
    },
    # The CPU preset for 28x28 inputs (MNIST, Fashion-MNIST, KMNIST): 49 patches of 4x4.
    "tiny-28": {
        "model": dict(img_size=28, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
        "optim": dict(lr_mae=3e-4, weight_decay_mae=0.05),
    },
    # The quality study's CPU recipe for 28x28 data (Fashion-MNIST), where pretraining beats its references
    # (README, Benchmarks): tiny-28's encoder on 16 patches of 7x7, Stage I at batch 128 (images, not steps, are
    # what a short run lacks), 6.4 epochs (1200 iterations, ~11 minutes of an MLO run on 2 cores), the probe on
    # the patch tokens' map (the spatial map a raw-pixel probe reads) and on their mean.
    "tiny-28-study": {
        "model": dict(img_size=28, patch_size=7, embed_dim=192, depth=4, num_heads=3,
                      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
        "optim": dict(lr_mae=1e-3, weight_decay_mae=0.05),
        "data": dict(batch_mae=128),
        "run": dict(epochs=6.4, eval_every=100, probe_features="tokens+mean"),  # 1200 iterations on 48,000 D_tr
    },
    "small": {
        "model": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6,
                      decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
        "optim": dict(lr_mae=5e-4, weight_decay_mae=0.05),
    },
    # The paper's CIFAR model: ViT-B at patch 2 (256 patches), decoder 512 x 8.
    "base-cifar": {
        "model": dict(img_size=32, patch_size=2, embed_dim=768, depth=12, num_heads=12,
                      decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
        "optim": dict(lr_mae=1e-4, weight_decay_mae=0.001),
        "data": dict(batch_mae=128, batch_head=128, batch_mask=128),
        "run": dict(epochs=200.0),
    },
    # The paper's ImageNet model: ViT-B/16 at 224 (196 patches).
    "base-imagenet": {
        "model": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
        "optim": dict(lr_mae=1e-4, weight_decay_mae=0.05),
        "data": dict(batch_mae=256, batch_head=256, batch_mask=256),
        "run": dict(epochs=50.0),
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "mlo.hypergradient": ("fd", "exact"),
    "mlo.stage1_norm": ("count", "sum"),
    "mlo.selection": ("topk", "mixed", "gumbel"),
    "mlo.baseline_rule": ("random", "background-first", "object-first"),
    "model.mask_net": ("mlp", "patch"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.precision": ("fp32", "bf16"),
    "data.augment": ("auto", "rrc", "pad-crop", "none"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "optim.schedule_head": ("cosine", "constant"),
}


def _sections() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(Config) if f.name != "preset"}


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def all_keys() -> list[str]:
    """Every settable dotted key, for error messages and --help."""
    keys = ["preset"]
    hints = typing.get_type_hints(Config)
    for name in _sections():
        keys += [f"{name}.{k}" for k in _field_types(hints[name])]
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any, where: str) -> Any:
    """Check ``value`` against the annotated type; YAML already parsed scalars."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0], where)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}'{key}' expects a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(key, v, a, where) for v, a in zip(value, args))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}'{key}' expects true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}'{key}' expects an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}'{key}' expects a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}'{key}' expects a string, got {value!r}")
    raise TypeError(f"unsupported config type {typ} for {key}")


def _apply(cfg: Config, updates: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(Config)
    for section, values in updates.items():
        if section == "preset":
            continue
        if section not in _sections():
            raise _unknown_key(section, where)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}section '{section}' must be a mapping of keys to values")
        target = getattr(cfg, section)
        types_ = _field_types(hints[section])
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in types_:
                raise _unknown_key(dotted, where)
            setattr(target, key, _coerce(dotted, value, types_[key], where))


def _preset(name: str, where: str = "") -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise ConfigError(f"{where}unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    return PRESETS[name]


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` from the command line; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(flat: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key == "preset":
            nested["preset"] = value  # type: ignore[assignment]
            continue
        if "." not in key:
            raise _unknown_key(key, where)
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


RECIPES = Path(__file__).resolve().parent / "recipes"  # config files shipped with the package


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong with a YAML text and where, in one line: the construct left open (an unclosed brace
    on line 2) and the place the parser gave up (line 3), both 1-based."""
    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    context, problem = getattr(err, "context", None), getattr(err, "problem", None)
    if problem is None:
        return "not valid YAML: " + " ".join(str(err).split())
    bracket = {"while parsing a flow mapping": "{", "while parsing a flow sequence": "["}.get(context or "")
    if bracket:
        return f"not valid YAML: the '{bracket}'{at(err.context_mark)} is not closed ({problem}{at(err.problem_mark)})"
    opened = f"{context}{at(err.context_mark)}: " if context else ""
    return f"not valid YAML: {opened}{problem}{at(err.problem_mark)}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file, or a built-in recipe by name (``paper``); errors name the file."""
    path = Path(path)
    if not path.is_file() and (RECIPES / f"{path}.yaml").is_file():
        path = RECIPES / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (built-in recipes: {', '.join(recipe_names())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def resolve(
    file: str | Path | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < preset < ``file`` < ``overrides`` (dotted keys)."""
    file_data = load_yaml(file) if file is not None else {}
    file_where = f"{file}: " if file is not None else ""
    flat_overrides = dict(overrides or {})
    cli_nested = _nest(flat_overrides, "command line: ")

    name = preset or cli_nested.get("preset") or file_data.get("preset") or Config.preset
    if not isinstance(name, str):
        raise ConfigError(f"{file_where}'preset' expects a name, got {name!r}")
    cfg = Config(preset=name)
    _apply(cfg, _preset(name, "" if preset else file_where), where="")
    _apply(cfg, file_data, where=file_where)
    _apply(cfg, cli_nested, where="command line: ")
    validate(cfg)
    return cfg


MAX_TOKEN_FEATURES = 16_384  # a token-map probe's features per image (its train matrix: D_tr x this, float32)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"'{key}' must be one of {', '.join(allowed)}, got '{value}'")
    m, o, d, r = cfg.model, cfg.optim, cfg.data, cfg.run
    if not 0.0 < cfg.mlo.mask_ratio < 1.0:
        raise ConfigError(f"'mlo.mask_ratio' must be between 0 and 1 (exclusive), got {cfg.mlo.mask_ratio}")
    if m.img_size % m.patch_size:
        raise ConfigError(f"'model.img_size' ({m.img_size}) must be a multiple of 'model.patch_size' ({m.patch_size})")
    if m.embed_dim % m.num_heads or m.decoder_embed_dim % m.decoder_num_heads:
        raise ConfigError("'model.embed_dim' and 'model.decoder_embed_dim' must divide by their number of heads")
    positive = {
        "model.depth": m.depth, "model.decoder_depth": m.decoder_depth,
        "mlo.unroll_mae": cfg.mlo.unroll_mae, "mlo.unroll_head": cfg.mlo.unroll_head,
        "mlo.unroll_mask": cfg.mlo.unroll_mask, "data.batch_mae": d.batch_mae,
        "data.batch_head": d.batch_head, "data.batch_mask": d.batch_mask,
        "run.log_every": r.log_every, "optim.lr_mae": o.lr_mae, "optim.lr_head": o.lr_head,
        "mlo.fd_alpha": cfg.mlo.fd_alpha, "run.epochs": r.epochs, "mlo.horizon": cfg.mlo.horizon,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive, got {value}")
    if o.lr_mask < 0:
        raise ConfigError(f"'optim.lr_mask' must be positive, or 0 to keep T at its initialisation, got {o.lr_mask}")
    mlo = cfg.mlo
    if mlo.baseline_rule != "random" and not mlo.baseline:
        raise ConfigError(f"'mlo.baseline_rule' {mlo.baseline_rule} applies to baseline runs (--baseline) only")
    if mlo.baseline and mlo.selection != "topk":
        raise ConfigError(f"'mlo.selection' {mlo.selection} chooses among T's scores: baseline runs have none "
                          f"(for masks without T, set 'mlo.baseline_rule')")
    if not 0.0 <= mlo.learned_fraction <= 1.0:
        raise ConfigError(f"'mlo.learned_fraction' must be in [0, 1], got {mlo.learned_fraction}")
    if mlo.horizon > d.batch_mae:
        raise ConfigError(f"'mlo.horizon' ({mlo.horizon}) splits a Stage-I batch into that many steps: it must be "
                          f"at most 'data.batch_mae' ({d.batch_mae})")
    for key in ("batch_head", "batch_mask"):
        if getattr(d, key) < 2:
            raise ConfigError(f"'data.{key}' must be at least 2 (the head normalises over the batch)")
    if m.mask_centre and m.mask_net != "mlp":
        raise ConfigError(f"'model.mask_centre' applies to 'model.mask_net' mlp only (got {m.mask_net})")
    pools = r.probe_features.split("+")
    if not pools or any(pool not in ("cls", "mean", "tokens") for pool in pools) or len(set(pools)) < len(pools):
        raise ConfigError(f"'run.probe_features' must be cls, mean or tokens, or several of them joined by '+' "
                          f"(e.g. tokens+mean), got '{r.probe_features}'")
    tokens = (m.img_size // m.patch_size) ** 2 * m.embed_dim
    if "tokens" in pools and tokens > MAX_TOKEN_FEATURES:
        raise ConfigError(f"'run.probe_features' tokens would read {tokens:,} features per image (N x d), more than "
                          f"{MAX_TOKEN_FEATURES:,}: use mean or cls for this model")
    if r.eval_every < 0:
        raise ConfigError(f"'run.eval_every' must be 0 (only at the end) or more, got {r.eval_every}")
    if r.eval_samples < 1:
        raise ConfigError(f"'run.eval_samples' must be at least 1, got {r.eval_samples}")
    if r.checkpoint_every < 0:
        raise ConfigError(f"'run.checkpoint_every' must be 0 (only at the end) or more, got {r.checkpoint_every}")
    if r.keep_checkpoints < 1:
        raise ConfigError(f"'run.keep_checkpoints' must be at least 1, got {r.keep_checkpoints}")
    if r.max_failures < -1:
        raise ConfigError(f"'run.max_failures' must be -1 (no limit) or more, got {r.max_failures}")
    if r.threads < 0:
        raise ConfigError(f"'run.threads' must be 0 (automatic) or more, got {r.threads}")
    if r.max_steps is not None and r.max_steps <= 0:
        raise ConfigError(f"'run.max_steps' must be positive, got {r.max_steps}")
    if not 0.0 <= o.warmup_fraction < 1.0:
        raise ConfigError(f"'optim.warmup_fraction' must be in [0, 1), got {o.warmup_fraction}")
    if not 0.0 <= o.final_lr_fraction <= 1.0:
        raise ConfigError(f"'optim.final_lr_fraction' must be in [0, 1], got {o.final_lr_fraction}")


def trains_mask(cfg: Config) -> bool:
    """Whether Stage III runs: an MLO run whose T learns (not a baseline, ``optim.lr_mask`` above 0)."""
    return not cfg.mlo.baseline and cfg.optim.lr_mask > 0


def describe_masking(cfg: Config) -> str:
    """How the run chooses its masks, in a few words (the run's header line)."""
    m = cfg.mlo
    if m.baseline:
        return f"baseline MAE ({'random masking' if m.baseline_rule == 'random' else m.baseline_rule + ' masks'})"
    details = [f"{m.hypergradient} hypergradient" if trains_mask(cfg) else "T frozen at its initialisation"]
    if m.selection != "topk":
        details.append(f"{m.selection} selection" + (f" up to {m.learned_fraction:g} learned"
                                                     if m.selection == "mixed" else ""))
    if m.horizon > 1 and trains_mask(cfg):
        details.append(f"horizon {m.horizon}")
    return f"MLO-MAE ({', '.join(details)})"


def total_iterations(cfg: Config, train_rows: int) -> int:
    """``run.max_steps``, else enough iterations for ``run.epochs`` passes of Stage I over D_tr."""
    if cfg.run.max_steps:
        return cfg.run.max_steps
    return max(1, math.ceil(cfg.run.epochs * train_rows / (cfg.data.batch_mae * cfg.mlo.unroll_mae)))


def lr_scale(rule: str, workers: int) -> float:
    """The factor ``optim.lr_scaling`` applies to every level's lr for ``workers`` data-parallel workers."""
    return {"linear": float(workers), "sqrt": workers ** 0.5, "none": 1.0}[rule]


def with_overrides(cfg: Config, overrides: Mapping[str, Any], where: str = "") -> Config:
    """A checked copy of ``cfg`` with dotted-key ``overrides`` applied (e.g. a Tune trial's sampled values)."""
    new = copy.deepcopy(cfg)
    _apply(new, _nest(overrides, where), where)
    validate(new)
    return new


# Keys added after runs were saved, with the value that reproduces what those runs did: a saved config
# without them resumes (and is probed, exported) as it was trained, not with today's defaults.
LEGACY = {"model": {"mask_net": "mlp", "mask_centre": False}, "mlo": {"stage1_norm": "count", "head_reuse": False},
          "optim": {"schedule_head": "cosine"}, "data": {"augment_head": True}}


def from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. inside a checkpoint)."""
    cfg = Config(preset=data.get("preset", Config.preset))
    _apply(cfg, {section: {k: v for k, v in values.items() if k not in data.get(section, {})}
                 for section, values in LEGACY.items()}, where="")
    _apply(cfg, data, where="saved config: ")
    validate(cfg)
    return cfg
