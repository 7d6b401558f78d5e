"""Hydra overrides outside of composition: sweeps expanded into their combinations, and overrides
applied to a config that was resolved already (an ensemble's own, for ``grow`` and ``distill``).

- :func:`expand_multirun` turns ``optimizer.lr=0.01,0.1 model=lenet,resnet`` (Hydra's sweep
  syntax: ``a,b``, ``choice(a,b)``, ``range(1,4)``) into one override list per combination, as
  Hydra's basic sweeper orders them (the first sweep varies slowest), without Hydra's launcher.
- :func:`apply_overrides` applies ``key=value``, ``+key=value`` and group choices
  (``model=lenet``: conf/model/lenet.yaml replaces the node) to a ``Config.to_dict()``; values are
  parsed by Hydra's grammar and must keep the type the key has. The result is validated.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, List, Optional

from ensemble_service.config import (
    GROUPS, Config, ConfigError, _conf_node, _resolve_entries, check_override, config_from_dict, group_key_hint,
    key_hint, validate,
)


def _parse(overrides: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    for o in overrides:
        check_override(o)
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        first = " ".join(str(exc).split("\n")[0].split())
        raise ConfigError(f"malformed override ({first}); overrides look like key=value, e.g. optimizer.lr=0.01")


def expand_multirun(overrides: List[str]) -> List[List[str]]:
    """One list of plain overrides per combination of the sweeps in ``overrides`` (Cartesian product,
    the first sweep varying slowest); ConfigError for a malformed override or a continuous sweep."""
    axes: List[List[str]] = []
    for o in _parse(overrides):
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ConfigError(f"{o.input_line}: a continuous sweep (interval) needs an optimizing sweeper; "
                                  "give the values: key=a,b,c or choice(...) or range(...)")
            key = o.get_key_element()
            values = list(o.sweep_string_iterator())
            if not values:
                raise ConfigError(f"{o.input_line} sweeps over no values")
            axes.append([f"{key}={v}" for v in values])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def _type_checked(key: str, old: Any, new: Any) -> Any:
    """``new`` for ``key`` whose current value is ``old``: same kind of value (an int where an int is,
    numbers where a float is, ...), or ConfigError."""
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
        new = float(new) if ok else new
    elif isinstance(old, str):
        ok = not isinstance(new, (dict, list))
        new = str(new) if ok and not isinstance(new, bool) else (str(new).lower() if ok else new)
    elif isinstance(old, dict):
        ok = isinstance(new, dict)
    elif isinstance(old, list):
        ok = isinstance(new, list)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"bad value for {key}: {new!r} is not a {type(old).__name__} like its value {old!r}")
    return new


def _groups(d: Dict[str, Any]) -> Dict[str, List[str]]:
    """A stored config's groups and their keys (what ``group_key_hint`` picks from)."""
    return {g: [str(k) for k in v] for g, v in d.items() if isinstance(v, dict) and g in GROUPS}


def apply_overrides(config: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``config`` (a resolved ``Config.to_dict()``) with ``overrides`` applied, as a new dict."""
    d = copy.deepcopy(config)
    for o in _parse(overrides):
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line} is a sweep; this command takes one value per key")
        if o.is_delete():
            raise ConfigError(f"{o.input_line}: deleting keys is not supported here")
        key = o.key_or_group
        if o.package is not None:
            raise ConfigError(f"{o.input_line}: package overrides (@) are not supported here")
        value = o.value()
        if "." not in key:
            if key == "experiment":
                raise ConfigError("experiment presets apply to `ensemble submit`; give their keys one by one")
            if key not in GROUPS:
                raise ConfigError(f"unknown config key '{key}'{group_key_hint(key, _groups(d))}")
            if not isinstance(value, str):
                raise ConfigError(f"{key}= takes the name of a conf/{key}/*.yaml file, got {value!r}")
            d[key] = _conf_node(key, value, key)
            continue
        node, parts = d, key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                if o.is_add() and isinstance(node, dict) and part not in node:
                    node[part] = {}
                elif i == 0:  # `trainr.epochs=3`
                    raise ConfigError(f"unknown config key '{key}'{group_key_hint(key, _groups(d))}")
                else:
                    raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}'")
            node = node[part]
        last = parts[-1]
        # the arguments of a `_target_` (a model, the optimizer, the user's own data loader) may be added
        custom = isinstance(d.get(parts[0]), dict) and "_target_" in d[parts[0]] and \
            parts[0] in ("model", "optimizer", "data")
        if last in node:
            node[last] = _type_checked(key, node[last], value)
        elif o.is_add() and custom:  # an argument of the user's own model class or data loader
            node[last] = value
        else:
            from ensemble_service.models.build import BUILTIN_TARGET

            own = custom and node.get("_target_") != BUILTIN_TARGET  # a user's class, or an optimizer
            raise ConfigError(f"unknown config key '{key}'{key_hint(key, own, [str(k) for k in node])}")
    return d


def resolved_config(config: Dict[str, Any], overrides: List[str] = (),
                    forced: Optional[Dict[str, Any]] = None) -> Config:
    """The validated Config of ``config`` with ``overrides`` applied, then the dotted keys in ``forced``
    set (``{"strategy.members": 5}``). ConfigError (one line) for anything wrong."""
    d = apply_overrides(config, list(overrides))
    for key, value in (forced or {}).items():
        node = d
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    cfg = config_from_dict(d)
    validate(cfg)
    _resolve_entries(cfg)
    return cfg
