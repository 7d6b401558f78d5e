"""Recipes: measured training settings for each built-in data set x model pair (conf/recipe/).

``conf/config.yaml`` lists ``optional recipe: ${data}_${model}``, so composing ``data=mnist1d
model=cnn1d`` also loads ``conf/recipe/mnist1d_cnn1d.yaml`` (with the final choices, an experiment's
included; a pair without a file, e.g. ``model=custom``, has none). A recipe names the optimizer
(a conf/optimizer option) and its ``lr`` and ``weight_decay``, and ``trainer.epochs``,
``trainer.batch_size``, ``trainer.schedule`` and ``trainer.warmup_epochs``; bench/quality.py measured
each one (bench/README.md says how they were found).

:func:`apply` (called by ``config.load_config``) writes it into the config, and loses to everything
the user chose:

* a key given on the command line keeps the user's value (``trainer.epochs=5``, ``optimizer.lr=0.01``);
* choosing an optimizer (``optimizer=adam`` or ``optimizer._target_=...``) drops the recipe's optimizer,
  ``lr`` and ``weight_decay`` (they were measured together);
* an experiment preset (``experiment=...``) is a recipe of its own: the recipe is not applied;
* recipes tune plain members: with another strategy or with ``strategy.models`` entries (which carry
  their own settings) it is not applied.

``~recipe`` leaves it out; ``recipe=<data>_<model>`` picks another pair's. :func:`describe` is the
line ``ensemble submit`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

#: recipe key -> the config key it sets
TRAINER_KEYS = ("epochs", "batch_size", "schedule", "warmup_epochs")


@dataclass
class RecipeConfig:
    name: str = ""
    optimizer: Optional[str] = None       # a conf/optimizer option (sgd, adam, adamw)
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule: Optional[str] = None        # trainer.schedule
    warmup_epochs: Optional[int] = None   # trainer.warmup_epochs
    epochs: Optional[int] = None          # trainer.epochs
    batch_size: Optional[int] = None      # trainer.batch_size
    # set by load_config, not by recipe files: what was applied, and what was not and why
    applied: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)
    skipped: str = ""


def _overrides(overrides: List[str]) -> Dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def apply(cfg, overrides: List[str], load_optimizer: Callable[[str], Dict[str, Any]]) -> None:
    """Write ``cfg.recipe`` into ``cfg`` (see the module docstring); ``load_optimizer(name)`` is
    conf/optimizer/<name>.yaml as a dict. Records what it did in ``cfg.recipe``."""
    r = cfg.recipe
    if r is None:
        return
    r.applied, r.kept, r.skipped = [], [], ""
    given = _overrides(overrides)
    experiment = given.get("experiment", "null")
    if experiment not in ("", "null"):
        r.skipped = f"experiment={experiment} sets its own training settings"
        return
    if cfg.strategy.name != "independent":
        r.skipped = (f"recipes were measured for strategy=independent; strategy={cfg.strategy.name} trains with "
                     "trainer and optimizer as given")
        return
    if getattr(cfg.strategy, "models", None):
        r.skipped = "strategy.models entries carry their own settings"
        return

    chosen = "optimizer" in given or "optimizer._target_" in given
    user_opt = {k.split(".", 1)[1]: cfg.optimizer.get(k.split(".", 1)[1]) for k in given
                if k.startswith("optimizer.") and k.split(".", 1)[1] in cfg.optimizer}
    recipe_opt = {k: getattr(r, k) for k in ("lr", "weight_decay") if getattr(r, k) is not None}
    if chosen:
        r.kept.append(f"optimizer={given.get('optimizer') or given['optimizer._target_']}")
    else:
        optimizer = load_optimizer(r.optimizer) if r.optimizer else dict(cfg.optimizer)
        if r.optimizer:
            r.applied.append(f"optimizer={r.optimizer}")
        for key, value in recipe_opt.items():
            if key in user_opt:
                continue
            optimizer[key] = value
            r.applied.append(f"{key}={_fmt(value)}")
        cfg.optimizer = {**optimizer, **user_opt}
    r.kept += [f"optimizer.{k}={_fmt(v)}" for k, v in user_opt.items() if k in recipe_opt or r.optimizer]
    for key in TRAINER_KEYS:
        value = getattr(r, key)
        if value is None:
            continue
        if f"trainer.{key}" in given:
            r.kept.append(f"trainer.{key}={given[f'trainer.{key}']}")
            continue
        epochs = cfg.trainer.epochs
        if key == "warmup_epochs" and isinstance(epochs, int) and not isinstance(epochs, bool) and \
                value >= epochs >= 1 and r.epochs:  # a run shorter than the recipe's: its warm-up scaled down
            scaled = min(epochs - 1, round(value * epochs / r.epochs))
            setattr(cfg.trainer, key, scaled)
            r.applied.append(f"{key}={scaled} (the recipe's {value} of {r.epochs} epochs, scaled to {epochs})")
            continue
        setattr(cfg.trainer, key, value)
        r.applied.append(f"{key}={_fmt(value)}")


def describe(recipe: Optional[RecipeConfig]) -> str:
    """``recipe mnist1d_cnn1d: optimizer=sgd lr=0.1 ... (kept from the command line: ...)``, or ''."""
    if recipe is None:
        return ""
    if recipe.skipped:
        return f"recipe {recipe.name}: not applied ({recipe.skipped})"
    line = f"recipe {recipe.name}: {' '.join(recipe.applied) or 'nothing applied'}"
    if recipe.kept:
        line += f" (kept from the command line: {' '.join(recipe.kept)})"
    return line
