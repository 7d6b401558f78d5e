"""``ensemble grow``: more members for a registered ensemble, without training its members again.

The ensemble's own resolved config (its parent run's config.yaml) with the user's overrides and
``strategy.members`` = existing + K is submitted through the runner's pipeline
(``runner.submit(..., reuse=...)``): only members n..n+K-1 are planned and trained (their seeds,
``trainer.seed`` + index, continue after the existing members'; ``strategy.models`` keeps cycling),
and the existing members (their runs' checkpoints and predictions, byte for byte) are members
0..n-1 of the new ensemble. The new parent run has the usual metrics, size curve and plots over
all members, links the ensemble it grew (``ensemble.grown_from``, ``ensemble.grown_from_version``)
and the member runs it reused (``ensemble.reused_members``; its member table names every member's
run), and the result is registered as a new version of the same registered model.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ensemble_service import names
from ensemble_service.config import Config, ConfigError, check_override

GROWABLE = ("independent",)


def prepare(ref: str, members: int, overrides: List[str], uri: Optional[str] = None):
    """The config of the grown ensemble and the ``runner.Reuse`` of its existing members.

    ConfigError (one line) for K < 1, an ensemble that cannot be grown, a bad override;
    ``registry.EnsembleNotFound`` for an unknown ensemble."""
    from ensemble_service import lineage
    from ensemble_service.overrides import resolved_config
    from ensemble_service.runner import Reuse
    from ensemble_service.tracking import RunReader

    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"--members must be at least 1, got {members}")
    for o in overrides:
        check_override(o)  # a malformed one is told before the store is read
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "strategy.members" or key == "strategy":
            raise ConfigError(f"{o}: grow keeps the ensemble's strategy; --members says how many members to add")
        if key in ("tracking.model_name", "tracking.uri", "tracking.register"):
            raise ConfigError(f"{o}: the grown ensemble is a new version of the same registered model, in the same "
                              "store (give --tracking-uri to name the store)")
    with RunReader(uri) as reader:
        ens = lineage.tracked_ensemble(reader, ref)
        if ens.strategy not in GROWABLE:
            raise ConfigError(f"{ens.ref} is a strategy={ens.strategy or '?'} ensemble; grow adds independent members "
                              f"to ensembles of strategy {', '.join(GROWABLE)}")
        existing = lineage.ensemble_members(reader, ens, eager=True)
        base = lineage.ensemble_config(reader, ens.parent)
        uri = reader.uri
    trained_on = (base.get("data") or {}).get("name")
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "data" and value != trained_on:
            raise ConfigError(f"{o}: grow trains the new members on the data set {ens.ref} was trained on "
                              f"(data={trained_on or '?'})")
    n = len(existing)
    cfg: Config = resolved_config(base, overrides, {
        "strategy.members": n + members, "tracking.uri": uri, "tracking.model_name": ens.name,
        "tracking.register": True, "tracking.sweep": None})
    reused = [m.run_id for m in existing]
    tags = {names.TAG_GROWN_FROM: ens.run_id, names.TAG_GROWN_FROM_VERSION: ens.ref,
            names.TAG_REUSED_MEMBERS: ",".join(reused)[:7900], names.TAG_MEMBERS: str(n + members)}

    def check(data) -> None:
        lineage.check_same_data(data, ens.info, ens.test_labels, ens.ref)

    return cfg, Reuse(members=existing, tags=tags, check_data=check)


def grow(ref: str, members: int, overrides: List[str] = (), uri: Optional[str] = None, observer=None,
         *, scheduler=None):
    """Grow the registered ensemble ``ref`` by ``members`` members (see the module docstring);
    the ``runner.SubmitResult`` of the new ensemble."""
    from ensemble_service.runner import submit

    cfg, reuse = prepare(ref, members, list(overrides), uri)
    return submit(cfg, observer, scheduler=scheduler, reuse=reuse)


def describe(cfg: Config, reuse) -> Tuple[str, str]:
    """(what grows, how) for the CLI's first line."""
    n = len(reuse.members)
    return reuse.tags[names.TAG_GROWN_FROM_VERSION], f"{n} members reused, {cfg.strategy.members - n} to train"
