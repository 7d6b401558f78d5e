"""Typed configuration: the Hydra schema, composition and validation.

The schema is a tree of dataclasses stored in Hydra's ConfigStore as ``base_config``;
``conf/config.yaml`` lists it first in its defaults, so every value a user types is
type-checked by OmegaConf while composing. ``validate`` then checks what types cannot
(known names, ranges, model/data compatibility, data files present) before anything
runs: no Ray is started and no MLflow run is created for a config that fails here.

Everything downstream receives the plain ``Config`` dataclass returned by ``load_config``
(``OmegaConf.to_object``), never Hydra's runtime config, which does not exist inside a
Ray worker.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ensemble_service.recipes import RecipeConfig
from ensemble_service.strategies import MAX_MEMBERS, STRATEGIES, StrategyConfig, StrategyError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
MIN_OBJECT_STORE = 75 * 1024 * 1024  # Ray refuses a smaller object store


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the problem and the choices."""


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"       # fp32 | bf16 (autocast of the training forward and loss)
    channels_last: bool = False   # image models and their batches in channels-last memory format
    schedule: str = "constant"    # learning rate of plain members: constant | cosine | step (ensemble_service/schedules.py)
    warmup_epochs: int = 0        # linear warm-up to optimizer.lr over this many epochs


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[float] = None
    cpus_per_member: float = 1.0
    gpus_per_member: float = 0.0
    max_retries: int = 3
    min_members: Optional[int] = None   # finish with at least this many members when others fail for good
    pack: int = 1                       # train up to this many same-architecture members in one task (torch.func)
    storage: Optional[str] = None       # resume checkpoints: a path or s3:// / gs:// URI (ensemble_service.storage)
    keep_checkpoints: bool = False      # keep them after the ensemble finished (default: removed)
    object_store_memory: Optional[int] = None   # bytes of the embedded cluster's object store (null: Ray's default)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "ensembles"
    run_name: Optional[str] = None
    model_name: Optional[str] = None   # registry name of the ensemble (default: the experiment name)
    register: bool = True              # register the finished ensemble in the MLflow Model Registry
    sweep: Optional[str] = None        # tag (ensemble.sweep) grouping the ensembles of one sweep (submit --multirun)


@dataclass
class Config:
    data: Any = None           # the data source's own schema (ensemble_service.data, conf/data/*.yaml)
    model: Any = None          # a `_target_` spec (conf/model/*.yaml), a plain dict once loaded
    strategy: StrategyConfig = field(default_factory=StrategyConfig)   # the strategy's own schema (strategies.py)
    optimizer: Any = None      # a `_target_` + `_partial_: true` spec (conf/optimizer/*.yaml)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    recipe: Optional[RecipeConfig] = None   # conf/recipe/<data>_<model>.yaml, applied by load_config (recipes.py)
    calibration: str = "temperature"        # temperature: fit one on the validation split, serve with it | none

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def register_schema() -> None:
    """Store the schema as `base_config` and each data source's schema as `data/<name>_schema`
    (conf/data/<name>.yaml lists it in its defaults). Imported lazily: workers never need Hydra."""
    from hydra.core.config_store import ConfigStore

    from ensemble_service.data import SOURCES

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for name in STRATEGIES.names():
        store.store(group="strategy", name=f"{name}_schema", node=STRATEGIES.get(name).Config)
    for name in SOURCES.names():
        if name != "custom":  # the user's loader takes any arguments: an untyped node
            store.store(group="data", name=f"{name}_schema", node=SOURCES.get(name).schema)

GROUPS = ("data", "model", "strategy", "optimizer", "trainer", "cluster", "tracking", "recipe", "experiment")


def conf_dir() -> Path:
    """The repository's conf/ (override with ENSEMBLE_CONF_DIR)."""
    env = os.environ.get("ENSEMBLE_CONF_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parent.parent / "conf").resolve()


def group_options(group: str) -> List[str]:
    d = conf_dir() / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _full_key(text: str) -> str:
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith("full_key:"):
            return line.split(":", 1)[1].strip()
    return ""


def _explain_compose_error(exc: BaseException, custom: frozenset = frozenset(),
                           node_keys: Callable[[str], Optional[List[str]]] = lambda group: None,
                           outside: Callable[[str], Optional[str]] = lambda key: None) -> str:
    """Turn Hydra/OmegaConf's multi-line errors into one line naming the problem (``custom``: the
    groups given as a `_target_` of the user's own; ``node_keys(group)``: the keys of a composed group
    without its overrides, for the model's and the optimizer's hints; ``outside(key)``: the message
    for a key in no group, ``epochs=3`` or ``trainr.epochs=3``)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    msg = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, OverrideParseException):
        return f"malformed override ({_one_line(msg.split(chr(10))[0])}); overrides look like key=value, e.g. strategy.members=5"
    if isinstance(exc, MissingConfigException) or "Could not find '" in msg:
        for group in GROUPS:
            marker = f"'{group}/"
            if marker in msg:
                name = msg.split(marker, 1)[1].split("'")[0]
                return f"unknown {group} '{name}'; choose one of: {', '.join(group_options(group))}"
    text = str(cause) if cause is not None else msg
    key = _full_key(text)
    first = text.strip().split("\n")[0]
    if "not in" in first and key:
        group = key.split(".")[0]
        if group not in GROUPS and (said := outside(key)):
            return said
        keys = node_keys(group) if group in ("model", "optimizer") else None
        return f"unknown config key '{key}'{_schema_hint(key, text) or key_hint(key, group in custom, keys)}"
    if key:
        return f"bad value for {key}: {_one_line(first)}"
    return _one_line(msg.strip().split("\n")[0]) or type(exc).__name__


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _select_custom_groups(overrides: List[str]) -> List[str]:
    """``model._target_=mypkg.Net`` without a ``model=...`` choice selects ``model=custom`` (a node
    holding only the target), so the default model's options (depth, width, ...) do not leak
    into the user's constructor; likewise for ``data._target_``."""
    keys = [_override_key(o) for o in overrides]
    extra = []
    for group in ("model", "data"):
        if f"{group}._target_" in keys and group not in keys and (conf_dir() / group / "custom.yaml").is_file():
            extra.append(f"{group}=custom")
    return extra + list(overrides)


def _schema_hint(key: str, text: str) -> str:
    """For a key the chosen strategy or data source does not have: which one it is, and its keys."""
    import difflib
    import re
    from dataclasses import fields as dc_fields

    found = re.search(r"object_type=(\w+)", text)
    group = key.split(".", 1)[0]
    if not found or group not in ("strategy", "data"):
        return ""
    if group == "strategy":
        catalog = [(n, STRATEGIES.get(n).Config) for n in STRATEGIES.names()]
    else:
        from ensemble_service.data import SOURCES

        catalog = [(n, SOURCES.get(n).schema) for n in SOURCES.names()]
    for name, schema in catalog:
        if schema.__name__ == found.group(1):
            keys = [f.name for f in dc_fields(schema) if f.name != "name"]
            sub = key.split(".", 1)[1]
            owners = [n for n, sch in catalog if sub in {f.name for f in dc_fields(sch)}]
            where = f" (a key of {group}={'/'.join(sorted(set(owners)))})" if owners else ""
            close = difflib.get_close_matches(sub, keys, n=1) if not owners else []
            guess = f" (did you mean {group}.{close[0]}?)" if close else ""
            return f" for {group}={name}{where}{guess}; its keys: {', '.join(keys)}"
    return ""


def key_hint(key: str, custom: bool = False, keys: Optional[List[str]] = None) -> str:
    """What to say after "unknown config key 'KEY'": the closest of the group's keys (``keys``, the
    node's own: a model's or an optimizer's; by default the trainer, cluster or tracking schema's)
    and, for a key of a ``_target_``'s arguments (``custom``: the model, the optimizer, the user's own
    loader), that a new one takes a ``+``; else the group's keys."""
    import difflib
    from dataclasses import fields as dc_fields

    group, _, sub = key.partition(".")
    if keys is None:
        schema = {"trainer": TrainerConfig, "cluster": ClusterConfig, "tracking": TrackingConfig}.get(group)
        keys = [f.name for f in dc_fields(schema)] if schema is not None else []
    keys = [k for k in keys if not k.startswith("_") and k != "name"]
    close = difflib.get_close_matches(sub, keys, n=1) if sub and "." not in sub else []
    guess = f"did you mean {group}.{close[0]}? " if close else ""
    if custom and group in ("model", "optimizer", "data") and sub and "." not in sub:
        return f" ({guess}{'or, for' if guess else 'for'} a new argument of the {group}'s `_target_`, " \
               f"add it with +{key}=...)"
    if not keys or not sub:
        return ""
    return f" ({guess}{group}'s keys: {', '.join(keys)})"


def group_key_hint(key: str, tree: Dict[str, List[str]]) -> str:
    """What to say after "unknown config key 'KEY'" for a key in no group, from ``tree`` (each group
    of the config and its keys; the recipe's, which a recipe file sets and the trainer's and
    optimizer's keys override, are left out): ``epochs`` -> `` (did you mean trainer.epochs?)``,
    ``trainr.epochs`` -> `` (did you mean trainer.epochs?)``, ``model_name`` -> `` (did you mean
    tracking.model_name or model=...?)``; else the groups."""
    import difflib

    tree = {g: [k for k in keys if not k.startswith("_") and k != "name"] for g, keys in tree.items()
            if g not in ("hydra", "recipe", "experiment")}
    head, _, rest = key.partition(".")
    if rest:  # a misspelt group
        close = difflib.get_close_matches(head, list(tree), n=1)
        guesses = [f"{close[0]}.{rest}"] if close else []
    else:
        guesses = [f"{g}.{key}" for g, keys in tree.items() if key in keys]
        if not guesses:
            near = difflib.get_close_matches(key, sorted({k for keys in tree.values() for k in keys}), n=2, cutoff=0.7)
            guesses = [f"{g}.{k}" for k in near for g, keys in tree.items() if k in keys]
        guesses += [f"{g}=..." for g in difflib.get_close_matches(key, list(tree), n=1)]  # `modle=lenet`
    if guesses:
        return f" (did you mean {' or '.join(guesses[:3])}?)"
    return f" (keys go with their group, e.g. trainer.epochs=3; groups: {', '.join(tree)})"


def _tree(cfg) -> Dict[str, List[str]]:
    """A composed config's groups and their keys."""
    from omegaconf import DictConfig

    return {str(g): [str(k) for k in node.keys()] for g, node in cfg.items() if isinstance(node, DictConfig)}


def _outside_groups(key: str, overrides: List[str]) -> Optional[str]:
    """The one-line message for the override of ``key`` (Hydra names a key in no group by its first
    part: ``trainr`` for ``trainr.epochs=3``), from the config composed without it."""
    given = [o for o in overrides if _override_key(o) == key or _override_key(o).startswith(key + ".")]
    if not given:
        return None
    full = _override_key(given[0])
    try:
        tree = _tree(_hydra_compose([o for o in overrides if o not in given]))
    except Exception:  # another override is bad too: Hydra's own message for this one
        return None
    return f"unknown config key '{full}'{group_key_hint(full, tree)}"


def _node_keys(group: str, overrides: List[str]) -> Optional[List[str]]:
    """The keys of the composed ``group`` node (the model's, the optimizer's) without the overrides
    of keys inside it: what a key that is not there could have meant. None if that fails too."""
    from omegaconf import DictConfig

    try:
        node = _hydra_compose([o for o in overrides if not _override_key(o).startswith(group + ".")]).get(group)
    except Exception:
        return None
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None


def _hydra_compose(overrides: List[str]):
    """conf/config.yaml composed with ``overrides`` by Hydra (its errors as Hydra raises them)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="ensemble"):
        return hydra_compose(config_name="config", overrides=overrides)


def check_override(override: str) -> None:
    """ConfigError (one line) for what is no key=value override at all: an option, no key, no '='
    (``~key`` deletes: no '=' there)."""
    if override.startswith("-"):
        raise ConfigError(f"unknown option {override!r}; overrides look like key=value (see the command's --help)")
    if not _override_key(override).strip():
        raise ConfigError(f"malformed override {override!r}: no key before '='; overrides look like key=value, "
                          "e.g. strategy.members=5")
    if "=" not in override and not override.startswith("~"):
        raise ConfigError(f"malformed override {override!r}: no '='; overrides look like key=value, "
                          "e.g. strategy.members=5")


def compose(overrides: List[str] | None = None):
    """Compose conf/config.yaml with Hydra overrides -> DictConfig (type-checked)."""
    register_schema()
    overrides = list(overrides or [])
    for o in overrides:
        check_override(o)
    overrides = _select_custom_groups(overrides)
    for o in overrides:  # `optional recipe` would silently skip a recipe that does not exist
        key, _, value = o.partition("=")
        if key.lstrip("+") == "recipe" and value not in ("", "null") and value not in group_options("recipe"):
            raise ConfigError(f"unknown recipe {value!r}; choose one of: {', '.join(group_options('recipe'))}")
    try:
        return _hydra_compose(overrides)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "bad input"
        given = {_override_key(o) for o in overrides}
        custom = frozenset(g for g in ("model", "data") if f"{g}._target_" in given)
        raise ConfigError(_explain_compose_error(exc, custom, lambda group: _node_keys(group, overrides),
                                                 lambda key: _outside_groups(key, overrides))) from None


def _unknown_key(node, obj, prefix: str = "") -> Optional[str]:
    """First key of the composed config that the schema does not have (`+foo=1`)."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig) or not is_dataclass(obj):
        return None
    names = {f.name for f in fields(obj)}
    for key in node.keys():
        if prefix == "" and key == "hydra":
            continue
        if str(key) not in names:
            return f"{prefix}{key}"
        found = _unknown_key(node._get_node(key), getattr(obj, str(key)), f"{prefix}{key}.")
        if found:
            return found
    return None


def to_plain(dcfg) -> Config:
    from omegaconf import OmegaConf

    from omegaconf.errors import MissingMandatoryValue

    try:
        obj = OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", "") or _full_key(str(exc)) or "a key"
        hint = " (your model's import path, e.g. mypkg.nets.TinyNet)" if key == "model._target_" else ""
        raise ConfigError(f"missing value for {key}{hint}") from None
    except Exception as exc:
        raise ConfigError(_explain_compose_error(exc)) from None
    if not isinstance(obj, Config):  # a raw dict would mean the schema was not applied
        raise ConfigError("config did not match the schema")
    extra = _unknown_key(dcfg, obj)
    if extra and "." not in extra:  # `+epochs=3`, `+trainr.epochs=3`: a key in no group
        from omegaconf import DictConfig

        sub = dcfg.get(extra)
        full = f"{extra}.{next(iter(sub.keys()))}" if isinstance(sub, DictConfig) and len(sub) else extra
        tree = {g: keys for g, keys in _tree(dcfg).items() if g != extra}
        raise ConfigError(f"unknown config key '{full}'{group_key_hint(full, tree)}")
    if extra:
        raise ConfigError(f"unknown config key '{extra}'{key_hint(extra)}")
    if isinstance(obj.data, dict):  # data=custom: `_target_` and the loader's own arguments
        from ensemble_service.data.custom import CustomData

        d = dict(obj.data)
        common = {k: d.pop(k) for k in ("val_fraction", "test_fraction", "split_seed", "standardize") if k in d}
        d.pop("name", None)
        obj.data = CustomData(target=d.pop("_target_", ""), args=d, **common)
    return obj


def _conf_node(group: str, name: Any, where: str) -> Dict[str, Any]:
    """conf/<group>/<name>.yaml as a plain dict (a name inside strategy.models)."""
    from omegaconf import OmegaConf

    path = conf_dir() / group / f"{name}.yaml"
    if not isinstance(name, str) or not name or "/" in name or not path.is_file():
        raise ConfigError(f"{where}: unknown {group} {name!r}; choose one of: {', '.join(group_options(group))}")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node.pop("defaults", None)
    return dict(node)


@dataclass(frozen=True)
class MemberSettings:
    """What one member trains with: its model spec, optimizer spec, epochs and batch size."""
    model: Dict[str, Any]
    optimizer: Dict[str, Any]
    epochs: int
    batch_size: int
    where: str          # the config path these come from ("model" or "strategy.models[i]")


def _entry_settings(cfg: Config, entry: Any, i: int) -> MemberSettings:
    where = f"strategy.models[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping such as {{name: lenet}} or {{_target_: mypkg.nets.Net}}, "
                          f"got {entry!r}")
    entry = dict(entry)
    opt = entry.pop("optimizer", None)
    trainer = entry.pop("trainer", None) or {}
    if not isinstance(trainer, dict) or set(trainer) - {"epochs", "batch_size"}:
        raise ConfigError(f"{where}.trainer may set only epochs and batch_size, got {trainer!r}")
    if "_target_" in entry:
        model = entry
    elif "name" in entry:
        model = {**_conf_node("model", entry["name"], where), **entry}
    else:
        raise ConfigError(f"{where} needs a name (a built-in model: {', '.join(group_options('model'))}) "
                          "or a _target_ (your model's import path)")
    if opt is None:
        optimizer = dict(cfg.optimizer)
    elif isinstance(opt, str):
        optimizer = _conf_node("optimizer", opt, f"{where}.optimizer")
    elif isinstance(opt, dict):
        optimizer = dict(opt) if "_target_" in opt else {**cfg.optimizer, **opt}
    else:
        raise ConfigError(f"{where}.optimizer must be an optimizer name ({', '.join(group_options('optimizer'))}) "
                          f"or a mapping, got {opt!r}")
    return MemberSettings(model=model, optimizer=optimizer,
                          epochs=trainer.get("epochs", cfg.trainer.epochs),
                          batch_size=trainer.get("batch_size", cfg.trainer.batch_size), where=where)


def model_variants(cfg: Config) -> List[MemberSettings]:
    """The distinct member settings: one per strategy.models entry, or the top-level model."""
    entries = getattr(cfg.strategy, "models", None)
    if entries:
        return [_entry_settings(cfg, e, i) for i, e in enumerate(entries)]
    return [MemberSettings(model=dict(cfg.model), optimizer=dict(cfg.optimizer), epochs=cfg.trainer.epochs,
                           batch_size=cfg.trainer.batch_size, where="model")]


def member_settings(cfg: Config) -> List[MemberSettings]:
    """Each member's settings: strategy.models cycled over strategy.members, or the model for all."""
    variants = model_variants(cfg)
    return [variants[i % len(variants)] for i in range(cfg.strategy.members)]


def _check_variant(ms: MemberSettings, input_shape, num_classes: int, built: Dict[str, Any]):
    """Build the member's model once (a forward pass on the data set's input shape) and its
    optimizer over a dummy parameter; one-line ConfigError naming where it comes from."""
    import json

    from ensemble_service.models import ModelError, build_model, check_model
    from ensemble_service.optimizers import OptimizerError, check_optimizer

    where_opt = "optimizer" if ms.where == "model" else f"{ms.where}.optimizer"
    for key, value in (("epochs", ms.epochs), ("batch_size", ms.batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            where = f"trainer.{key}" if ms.where == "model" else f"{ms.where}.trainer.{key}"
            raise ConfigError(f"{where} must be at least 1, got {value}")
    key = json.dumps([ms.model, list(input_shape), num_classes], sort_keys=True, default=str)
    try:
        if key not in built:
            check_model(ms.model, input_shape, num_classes, ms.where)
            built[key] = build_model(ms.model, input_shape, num_classes, ms.where)
        check_optimizer(ms.optimizer, where_opt)
    except (ModelError, OptimizerError) as exc:
        raise ConfigError(str(exc)) from None
    return built[key]


def check_members(cfg: Config, input_shape, num_classes: int) -> None:
    """Build every member's model once for the data set's input shape and class count (a forward
    pass), its optimizer over a dummy parameter, and run the strategy's checks that need the model.
    Runs in ``validate`` when the shape is known from the config, else after the data is loaded."""
    built: Dict[str, Any] = {}
    models = [_check_variant(ms, tuple(input_shape), int(num_classes), built) for ms in model_variants(cfg)]
    _validate_strategy(cfg, models[0])


def validate(cfg: Config, *, check_files: bool = True) -> None:
    """Raise ConfigError (one line) for anything that would fail later."""
    from ensemble_service import data as data_mod

    # data: the source's own checks (files present, options) when check_files; the shape of its
    # inputs when known without reading the files (else models are checked once the data is loaded)
    for key in ("val_fraction", "test_fraction"):
        v = getattr(cfg.data, key)
        if not (0.0 < v < 0.5):
            raise ConfigError(f"data.{key} must be in (0, 0.5), got {v}")
    try:
        if check_files:
            data_mod.check(cfg.data)
        info = data_mod.info(cfg.data)
    except data_mod.DataError as exc:
        raise ConfigError(str(exc)) from None

    # strategy
    s = cfg.strategy
    try:
        strategy = STRATEGIES.get(s.name)
    except StrategyError as exc:
        raise ConfigError(str(exc)) from None
    key = strategy.alias or "members"
    if getattr(s, key) < 1:
        raise ConfigError(f"strategy.{key} must be at least 1, got {getattr(s, key)}")
    total = strategy.total(s)
    if total > MAX_MEMBERS:
        raise ConfigError(f"strategy={s.name} would train {total} members; the most an ensemble may have is "
                          f"{MAX_MEMBERS} (each is a Ray task's output, an MLflow run and a served member)")

    # models and their training settings: each built once, here, on the driver
    if not isinstance(cfg.model, dict) or not isinstance(cfg.optimizer, dict):
        raise ConfigError("model and optimizer must be config groups (model=mlp, optimizer=adam, ...)")
    if info.input_shape is not None:
        check_members(cfg, info.input_shape, info.num_classes)
    else:
        _validate_strategy(cfg, None)

    # trainer
    t = cfg.trainer
    if t.device not in DEVICES:
        raise ConfigError(f"unknown trainer.device '{t.device}'; choose one of: {', '.join(DEVICES)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{t.precision}'; choose one of: {', '.join(PRECISIONS)}")
    _validate_schedule(cfg)

    # cluster
    c = cfg.cluster
    if not c.cpus_per_member > 0:
        raise ConfigError(f"cluster.cpus_per_member must be > 0, got {c.cpus_per_member}")
    if c.gpus_per_member < 0 or (c.gpus_per_member > 1 and c.gpus_per_member != int(c.gpus_per_member)):
        raise ConfigError(
            f"cluster.gpus_per_member must be a fraction in [0, 1] or a whole number, got {c.gpus_per_member}"
        )
    if t.device == "cuda" and c.gpus_per_member <= 0:
        raise ConfigError("trainer.device=cuda needs cluster.gpus_per_member > 0 (Ray gives a task a GPU only "
                          "when it asks for one); or leave trainer.device=auto")
    if c.max_retries < 0:
        raise ConfigError(f"cluster.max_retries must be >= 0, got {c.max_retries}")
    if c.pack < 1:
        raise ConfigError(f"cluster.pack must be at least 1, got {c.pack}")
    if c.pack > 1 and STRATEGIES.get(cfg.strategy.name).trajectory:
        raise ConfigError(f"cluster.pack packs independent members; strategy={cfg.strategy.name} trains "
                          "trajectories (set cluster.pack=1)")
    if getattr(cfg.data, "streaming", False):
        if STRATEGIES.get(cfg.strategy.name).trajectory:
            raise ConfigError(f"data.streaming streams independent members' epochs; strategy={cfg.strategy.name} "
                              "needs its data in memory (use strategy=independent, or data.streaming=false)")
        if c.pack > 1:
            raise ConfigError("cluster.pack needs the data in memory; with data.streaming=true set cluster.pack=1")
    if c.pack > 1 and (t.precision != "fp32" or t.channels_last):
        raise ConfigError("cluster.pack trains in fp32 with the default memory format; set trainer.precision=fp32 "
                          "and trainer.channels_last=false, or cluster.pack=1")
    if c.pack > 1:
        from ensemble_service.optimizers import ELEMENTWISE, elementwise, label

        for ms in model_variants(cfg):
            if not elementwise(ms.optimizer):
                raise ConfigError(f"cluster.pack trains members as one stacked model, which needs an optimizer "
                                  f"whose update is elementwise ({', '.join(sorted(n.split('.')[-1] for n in ELEMENTWISE))}); "
                                  f"{label(ms.optimizer)} is not one (set cluster.pack=1)")
    if c.min_members is not None and c.min_members < 1:
        raise ConfigError(f"cluster.min_members must be at least 1, got {c.min_members}")
    if c.num_cpus is not None and c.num_cpus < 1:
        raise ConfigError(f"cluster.num_cpus must be at least 1, got {c.num_cpus}")
    if c.object_store_memory is not None and c.object_store_memory < MIN_OBJECT_STORE:
        raise ConfigError(f"cluster.object_store_memory must be at least {MIN_OBJECT_STORE} bytes (75 MiB, Ray's "
                          f"minimum), got {c.object_store_memory}")
    if c.num_cpus is not None and c.cpus_per_member > c.num_cpus:
        raise ConfigError(
            f"cluster.cpus_per_member ({c.cpus_per_member}) exceeds cluster.num_cpus ({c.num_cpus}): no member could start"
        )

    if cfg.calibration not in ("temperature", "none"):
        raise ConfigError(f"unknown calibration '{cfg.calibration}'; choose one of: temperature, none")

    # tracking
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment must not be empty")
    name = cfg.tracking.model_name
    if name is not None:
        bad = [c for c in "/:@" if c in name]
        if not name.strip() or bad or name != name.strip():
            why = (f"must not contain {' or '.join(repr(c) for c in bad)} (they separate names, versions and "
                   "aliases in models:/name@alias)") if bad else "must not be empty or start/end with spaces"
            raise ConfigError(f"tracking.model_name={name!r} {why}; leave it null to use the experiment name")


def _validate_schedule(cfg: Config) -> None:
    """trainer.schedule / trainer.warmup_epochs: known, in range, and only where members train plainly."""
    from ensemble_service.schedules import SCHEDULES

    t = cfg.trainer
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"unknown trainer.schedule '{t.schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if t.warmup_epochs < 0:
        raise ConfigError(f"trainer.warmup_epochs must be >= 0, got {t.warmup_epochs}")
    if (t.schedule != "constant" or t.warmup_epochs) and STRATEGIES.get(cfg.strategy.name).trajectory:
        raise ConfigError(f"trainer.schedule and trainer.warmup_epochs apply to strategy=independent; "
                          f"strategy={cfg.strategy.name} sets its own learning rate (use trainer.schedule=constant "
                          "trainer.warmup_epochs=0)")
    for ms in model_variants(cfg):
        where = "trainer.epochs" if ms.where == "model" else f"{ms.where}.trainer.epochs"
        if isinstance(ms.epochs, bool) or not isinstance(ms.epochs, int) or ms.epochs < 1:
            raise ConfigError(f"{where} must be at least 1, got {ms.epochs}")
        if t.warmup_epochs >= ms.epochs:
            raise ConfigError(f"trainer.warmup_epochs ({t.warmup_epochs}) must be below {where} ({ms.epochs})")


def _validate_strategy(cfg: Config, model) -> None:
    """The strategy's own checks (``model`` is the first member's model, or None before the data
    set's input shape is known), then the checks that need the member count."""
    strategy = STRATEGIES.get(cfg.strategy.name)
    try:
        strategy.validate(cfg.strategy, cfg.trainer.epochs, cfg.optimizer, model, cfg.model)
    except StrategyError as exc:
        raise ConfigError(str(exc)) from None
    total, need = strategy.total(cfg.strategy), cfg.cluster.min_members
    if need is not None and need > total:
        raise ConfigError(f"cluster.min_members={need} exceeds the {total} members strategy={cfg.strategy.name} "
                          "trains; lower it (or leave it null: every member must finish)")


def _resolve_alias(cfg: Config, overrides: List[str]) -> None:
    """``strategy.members`` is an alias of the strategy's own count (snapshot/fge ``cycles``, heads
    ``heads``, mc_dropout ``samples``): both given with different values is an error; afterwards
    ``members`` equals the count."""
    alias = STRATEGIES.get(cfg.strategy.name).alias if cfg.strategy.name in STRATEGIES else None
    if not alias:
        return
    keys = {_override_key(o) for o in overrides}
    value = getattr(cfg.strategy, alias)
    if {"strategy.members", f"strategy.{alias}"} <= keys and cfg.strategy.members != value:
        raise ConfigError(f"strategy.members={cfg.strategy.members} and strategy.{alias}={value} disagree; for "
                          f"strategy={cfg.strategy.name} they are one setting: give one of them")
    cfg.strategy.members = value


def _resolve_entries(cfg: Config) -> None:
    """Write strategy.models entries out in full (model spec with its optimizer spec and trainer
    settings), so the config needs no conf/ files any more (a remote job, a logged config.yaml)."""
    entries = getattr(cfg.strategy, "models", None)
    if entries:
        cfg.strategy.models = [{**ms.model, "optimizer": dict(ms.optimizer),
                                "trainer": {"epochs": ms.epochs, "batch_size": ms.batch_size}}
                               for ms in model_variants(cfg)]


def config_from_dict(d: Dict[str, Any]) -> Config:
    """The Config a resolved ``Config.to_dict()`` came from (a remote job's config); validate it
    afterwards. Raises ConfigError for anything that is not such a dict."""
    from ensemble_service.data import DataError, as_config

    try:
        strategy = STRATEGIES.get(d["strategy"]["name"]).Config(**d["strategy"])
        recipe = RecipeConfig(**d["recipe"]) if d.get("recipe") else None   # applied already
        return Config(data=as_config(dict(d["data"])), model=dict(d["model"]), strategy=strategy,
                      optimizer=dict(d["optimizer"]), trainer=TrainerConfig(**d["trainer"]),
                      cluster=ClusterConfig(**d["cluster"]), tracking=TrackingConfig(**d["tracking"]), recipe=recipe,
                      calibration=d.get("calibration", "temperature"))
    except (KeyError, TypeError, ValueError, StrategyError, DataError) as exc:
        raise ConfigError(f"not a resolved ensemble config ({type(exc).__name__}: {exc})") from None


def load_config(overrides: List[str] | None = None, *, check_files: bool = True) -> Config:
    """Compose, convert to the plain dataclass and validate. Raises ConfigError."""
    from ensemble_service import recipes

    cfg = to_plain(compose(overrides))
    _resolve_alias(cfg, list(overrides or []))
    recipes.apply(cfg, list(overrides or []), lambda name: _conf_node("optimizer", name, f"recipe {cfg.recipe.name}"))
    validate(cfg, check_files=check_files)
    _resolve_entries(cfg)
    return cfg
