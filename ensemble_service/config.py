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

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

STRATEGIES = ("independent", "snapshot", "swa", "fge", "heads", "mc_dropout")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


def service_env_defaults() -> None:
    """Set where the service starts Ray or MLflow (these machines have no internet): no usage
    stats or telemetry, and RAY_AUTH_MODE explicitly: token when a token is given, else disabled."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ.setdefault("RAY_AUTH_MODE", "token" if has_token else "disabled")


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the problem and the choices."""


@dataclass
class SyntheticConfig:
    n_train: int = 96
    n_val: int = 48
    n_test: int = 48
    num_classes: int = 3
    input_shape: List[int] = field(default_factory=lambda: [1, 8, 8])


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "./data"
    download: bool = False
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    # options of the `synthetic` data set only
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    name: str = "mlp"
    batchnorm: bool = False
    dropout: float = 0.0
    init: str = "default"
    activation: str = "relu"
    depth: Optional[int] = None
    width: Optional[int] = None


@dataclass
class StrategyConfig:
    """Keys of every strategy; each strategy reads its own (see conf/strategy/*.yaml)."""
    name: str = "independent"
    members: int = 5
    # independent
    bagging: bool = False
    # mixed-architecture ensembles: member i uses models[i % len(models)]; empty = `model`
    models: List[ModelConfig] = field(default_factory=list)
    # trajectory strategies: T independent trajectories, one Ray task each
    trajectories: int = 1
    # snapshot (M cycles of a cyclic cosine lr, a snapshot at each cycle's end) and fge
    cycles: int = 5
    use_last: Optional[int] = None
    # swa
    swa_start: Optional[int] = None   # completed epochs before averaging starts (null: 75% of trainer.epochs)
    swa_lr: float = 0.01
    # fge: pre-training for trainer.epochs - cycles * cycle_epochs epochs, then cycles between lr1 and lr2
    cycle_epochs: int = 2
    lr1: float = 0.05
    lr2: float = 0.0005
    # heads: one shared backbone, K classifier heads
    heads: int = 5
    # mc_dropout: S stochastic forward passes at test time
    samples: int = 10


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"


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
    storage: Optional[str] = None


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "ensembles"
    run_name: Optional[str] = None
    model_name: Optional[str] = None   # registry name of the ensemble (default: the experiment name)
    register: bool = True              # register the finished ensemble in the MLflow Model Registry


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def register_schema() -> None:
    """Store the schema as `base_config` (imported lazily: workers never need Hydra)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)

GROUPS = ("data", "model", "strategy", "optimizer", "trainer", "cluster", "tracking", "experiment")


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


def _explain_compose_error(exc: BaseException) -> str:
    """Turn Hydra/OmegaConf's multi-line errors into one line naming the problem."""
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
        return f"unknown config key '{key}'"
    if key:
        return f"bad value for {key}: {_one_line(first)}"
    return _one_line(msg.strip().split("\n")[0]) or type(exc).__name__


def compose(overrides: List[str] | None = None):
    """Compose conf/config.yaml with Hydra overrides -> DictConfig (type-checked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    overrides = list(overrides or [])
    for o in overrides:
        if o.startswith("-"):
            raise ConfigError(f"unknown option {o!r}; overrides look like key=value (see `ensemble submit --help`)")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="ensemble"):
            return hydra_compose(config_name="config", overrides=overrides)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "bad input"
        raise ConfigError(_explain_compose_error(exc)) from None


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

    try:
        obj = OmegaConf.to_object(dcfg)
    except Exception as exc:
        raise ConfigError(_explain_compose_error(exc)) from None
    if not isinstance(obj, Config):  # a raw dict would mean the schema was not applied
        raise ConfigError("config did not match the schema")
    extra = _unknown_key(dcfg, obj)
    if extra:
        raise ConfigError(f"unknown config key '{extra}'")
    return obj


def _check_model(m: ModelConfig, input_shape, where: str) -> None:
    from ensemble_service.models import ModelError, check_model_options

    try:
        check_model_options(
            m.name, tuple(input_shape), depth=m.depth, dropout=m.dropout,
            init=m.init, activation=m.activation, width=m.width,
        )
    except ModelError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def validate(cfg: Config, *, check_files: bool = True) -> None:
    """Raise ConfigError (one line) for anything that would fail later."""
    from ensemble_service import data as data_mod

    # data
    try:
        info = data_mod.dataset_info(cfg.data.name)
    except data_mod.DataError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("val_fraction", "test_fraction"):
        v = getattr(cfg.data, key)
        if not (0.0 < v < 0.5):
            raise ConfigError(f"data.{key} must be in (0, 0.5), got {v}")
    input_shape = info.input_shape
    if cfg.data.name == "synthetic":
        syn = cfg.data.synthetic
        if min(syn.n_train, syn.n_val, syn.n_test) < 1 or syn.num_classes < 2 or not syn.input_shape:
            raise ConfigError("data.synthetic needs n_train, n_val, n_test >= 1, num_classes >= 2 and an input_shape")
        input_shape = tuple(syn.input_shape)
    if check_files:
        try:
            data_mod.check_available(cfg.data.name, cfg.data.root, cfg.data.download)
        except data_mod.DataError as exc:
            raise ConfigError(str(exc)) from None

    # strategy
    s = cfg.strategy
    if s.name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{s.name}'; choose one of: {', '.join(STRATEGIES)}")
    if s.members < 1:
        raise ConfigError(f"strategy.members must be at least 1, got {s.members}")
    _validate_strategy(cfg)

    # models
    if s.models:
        for i, m in enumerate(s.models):
            _check_model(m, input_shape, f"strategy.models[{i}]")
    else:
        _check_model(cfg.model, input_shape, "model")

    # optimizer
    o = cfg.optimizer
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{o.name}'; choose one of: {', '.join(OPTIMIZERS)}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"optimizer.lr must be a positive number, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    if not (0.0 <= o.momentum < 1.0):
        raise ConfigError(f"optimizer.momentum must be in [0, 1), got {o.momentum}")

    # trainer
    t = cfg.trainer
    if t.epochs < 1:
        raise ConfigError(f"trainer.epochs must be at least 1, got {t.epochs}")
    if t.batch_size < 1:
        raise ConfigError(f"trainer.batch_size must be at least 1, got {t.batch_size}")
    if t.device not in DEVICES:
        raise ConfigError(f"unknown trainer.device '{t.device}'; choose one of: {', '.join(DEVICES)}")

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
    if c.pack > 1 and cfg.strategy.name != "independent":
        raise ConfigError(f"cluster.pack packs independent members; strategy={cfg.strategy.name} trains "
                          "trajectories (set cluster.pack=1)")
    if c.min_members is not None and c.min_members < 1:
        raise ConfigError(f"cluster.min_members must be at least 1, got {c.min_members}")
    if c.num_cpus is not None and c.num_cpus < 1:
        raise ConfigError(f"cluster.num_cpus must be at least 1, got {c.num_cpus}")
    if c.num_cpus is not None and c.cpus_per_member > c.num_cpus:
        raise ConfigError(
            f"cluster.cpus_per_member ({c.cpus_per_member}) exceeds cluster.num_cpus ({c.num_cpus}): no member could start"
        )

    # tracking
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment must not be empty")


def _validate_strategy(cfg: Config) -> None:
    s, epochs = cfg.strategy, cfg.trainer.epochs
    if s.name == "independent":
        return
    if s.models:
        raise ConfigError(f"strategy.models (mixed architectures) needs strategy=independent, not {s.name}")
    if s.bagging:
        raise ConfigError(f"strategy.bagging needs strategy=independent, not {s.name}")
    if s.trajectories < 1:
        raise ConfigError(f"strategy.trajectories must be at least 1, got {s.trajectories}")
    if s.name == "snapshot":
        if s.cycles < 1:
            raise ConfigError(f"strategy.cycles must be at least 1, got {s.cycles}")
        if epochs % s.cycles:
            raise ConfigError(f"strategy=snapshot needs trainer.epochs ({epochs}) to be a multiple of "
                              f"strategy.cycles ({s.cycles}), so that every cycle ends with an epoch")
        if s.use_last is not None and not (1 <= s.use_last <= s.cycles):
            raise ConfigError(f"strategy.use_last must be between 1 and strategy.cycles ({s.cycles}), got {s.use_last}")
    elif s.name == "swa":
        if s.trajectories != 1:
            raise ConfigError(
                f"strategy=swa averages parameters over one trajectory only; strategy.trajectories={s.trajectories} "
                "would average across independent runs, which does not work (their weights are not in one basin); "
                "use strategy=independent to combine independent runs by their predictions")
        start = swa_start(cfg)
        if not (0 <= start < epochs):
            raise ConfigError(f"strategy.swa_start must be in [0, trainer.epochs={epochs}), got {start}")
        if not s.swa_lr > 0:
            raise ConfigError(f"strategy.swa_lr must be > 0, got {s.swa_lr}")
    elif s.name == "fge":
        if s.cycles < 1:
            raise ConfigError(f"strategy.cycles must be at least 1, got {s.cycles}")
        if s.cycle_epochs < 2 or s.cycle_epochs % 2:
            raise ConfigError(f"strategy.cycle_epochs must be an even number >= 2 (a member is collected at "
                              f"mid-cycle), got {s.cycle_epochs}")
        if epochs <= s.cycles * s.cycle_epochs:
            raise ConfigError(f"strategy=fge needs trainer.epochs ({epochs}) > strategy.cycles * strategy.cycle_epochs "
                              f"({s.cycles * s.cycle_epochs}) to leave epochs for pre-training")
        if not (s.lr1 > s.lr2 > 0):
            raise ConfigError(f"strategy=fge needs strategy.lr1 > strategy.lr2 > 0, got lr1={s.lr1}, lr2={s.lr2}")
    elif s.name == "heads":
        if s.heads < 1:
            raise ConfigError(f"strategy.heads must be at least 1, got {s.heads}")
    elif s.name == "mc_dropout":
        if s.samples < 1:
            raise ConfigError(f"strategy.samples must be at least 1, got {s.samples}")
        if not cfg.model.dropout > 0:
            raise ConfigError(f"strategy=mc_dropout needs a model with dropout: set model.dropout > 0 "
                              f"(got {cfg.model.dropout}); its test-time passes are the members")


def swa_start(cfg: Config) -> int:
    s = cfg.strategy.swa_start
    return int(0.75 * cfg.trainer.epochs) if s is None else s


def load_config(overrides: List[str] | None = None, *, check_files: bool = True) -> Config:
    """Compose, convert to the plain dataclass and validate. Raises ConfigError."""
    cfg = to_plain(compose(overrides))
    validate(cfg, check_files=check_files)
    return cfg
