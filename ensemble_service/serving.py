"""Serve an ensemble: inference only. Rebuild its members, preprocess raw inputs, run, combine.

Pure torch and NumPy: no MLflow, no Ray. The HTTP API (``ensemble_service.api``) and the MLflow
pyfunc model (``ensemble_service.pyfunc_model``) both load ensembles through this module, so the
endpoint and ``mlflow.pyfunc.load_model(...).predict`` run the same code. The formats (member
checkpoint, ensemble directory) belong to ``ensemble_service.artifact``.

Members
-------
Each member is rebuilt from its checkpoint (its model spec through
``ensemble_service.models.build_model``, then its ``state_dict``) and put in eval mode.

Inputs
------
An ensemble trained on a data set with preprocessing (its manifest's ``preprocessing``, see
``ensemble_service.data.preprocess``) takes *raw* inputs in the training data's format and applies
that pipeline itself; its ``class_names`` name the labels. Without one (ensembles assembled from
checkpoints by hand) inputs are model inputs, ``[B, *input_shape]`` or flattened.

Forward
-------
Members are grouped before the first request:

* *stacked groups*: members with the same architecture (model config, input shape,
  class count and state-dict layout) run as **one** batched forward: their weights are
  stacked with ``torch.func.stack_module_state`` and the module is called with
  ``torch.func.functional_call`` under ``torch.func.vmap`` (a group of one is called
  directly). On the CPU the vmapped forward is the faster one only for small batches of
  convolutional members, so there a group runs its members one after another from
  ``LOOP_MIN_BATCH`` rows on, and always when they have no convolutions; the two paths agree to
  float rounding (about 1e-7), and which one runs depends only on the batch's size and device;
* *MC-dropout groups*: members that are stochastic passes of one trained model
  (``role == "mc_sample"``) share one module; pass ``s`` runs with only the Dropout
  modules in train mode (BatchNorm stays in eval) after ``torch.manual_seed(seed_s)``,
  inside ``torch.random.fork_rng`` so the caller's RNG state is untouched, in chunks of
  1024 like ``workers.trajectory.mc_dropout_logits``: the same inputs give the same
  answer on every request. The global RNG is shared by all threads, so these passes
  hold a module-level lock.

Member outputs (logits ``[M, B, C]``, member order) are combined with
``ensemble_service.aggregation.aggregate(kind="logits")``: ``mean`` (softmax, then
average), ``vote``, ``weighted`` (weights from the members' validation accuracy unless
given) and ``logit_mean``. An ensemble whose manifest gives every member a ``weight`` (a
selection's share of the picks, ``ensemble select``) uses those weights for every method unless
the caller gives others: its ``mean`` is the weighted mean, its ``vote`` a weighted vote.

Calibration and uncertainty
---------------------------
An ensemble registered with a temperature (its manifest's ``temperature``, fitted on the validation
split) answers the combined probabilities of ``mean``, ``weighted`` and ``logit_mean`` scaled by it,
``softmax(ln p / T)`` (``aggregation.temperature_scale``; labels do not change), unless asked
``calibrated=False``; vote shares are never scaled. ``return_uncertainty`` adds, per item, the
members' predictive entropy, expected entropy and mutual information
(``aggregation.uncertainty``, with the request's weights, from the members' own probabilities, so
``entropy = expected_entropy + mutual_information``), and for ``vote`` the winning label's vote share.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ensemble_service import aggregation, artifact
from ensemble_service.data.preprocess import Pipeline, PreprocessError
from ensemble_service.models import architecture as model_architecture, build_model

__all__ = ["EVAL_BATCH", "ServingError", "Member", "MemberLogits", "Prediction", "Ensemble", "load_ensemble_dir", "as_input_tensor"]

EVAL_BATCH = 1024
#: On the CPU, members of one architecture run vmapped over their stacked weights only while a
#: batch of convolutional members has fewer rows than this; from it on, and always for members
#: without convolutions, they run one after another. Measured on 2 CPU cores (torch 1 and 2
#: threads, 5 members, `bench/bench_forward.py`): vmapped LeNets / ResNet-8s took 0.6-0.8x the
#: loop's time at 1 row, about the same at 16, 1.2-1.7x at 64 and 1.2-2.3x at 256; vmapped MLPs
#: 0.9-1.5x at every batch size (1.3-1.6x at one thread).
LOOP_MIN_BATCH = 16
_RNG_LOCK = threading.Lock()
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ServingError(ValueError):
    """Bad input to an ensemble (or a bad ensemble); ``field`` names the offending field."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------- members


@dataclass
class Member:
    """One member: its manifest record and its rebuilt module (eval mode)."""

    record: Dict[str, Any]
    module: nn.Module
    model_cfg: Dict[str, Any]
    input_shape: Tuple[int, ...]
    num_classes: int
    key: str  # identifies the weights (equal for MC samples of one model)

    @property
    def index(self) -> int:
        return int(self.record["index"])

    @property
    def role(self) -> str:
        return str(self.record.get("role", "member"))

    @property
    def architecture(self) -> str:
        return str(self.record.get("architecture") or model_architecture(self.model_cfg))


def _build_module(ckpt: Mapping[str, Any]) -> nn.Module:
    spec = dict(ckpt["model"])
    name = model_architecture(spec) if ("_target_" in spec or "name" in spec) else "?"
    try:
        module = build_model(spec, tuple(int(s) for s in ckpt["input_shape"]), int(ckpt["num_classes"]))
        module.load_state_dict(ckpt["state_dict"])
    except ServingError:
        raise
    except Exception as exc:
        raise ServingError(f"cannot rebuild member ({name}): {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _signature(m: Member) -> str:
    state = [(k, tuple(v.shape), str(v.dtype)) for k, v in m.module.state_dict().items()]
    return json.dumps([m.model_cfg, list(m.input_shape), m.num_classes, state], sort_keys=True, default=str)


# --------------------------------------------------------------------------- groups


class _StackedGroup:
    """Members of one architecture: one vmapped forward over their stacked weights, or, on the
    CPU, the members one after another where that is faster (:meth:`use_loop`)."""

    def __init__(self, members: List[Member], positions: List[int]):
        self.positions = positions
        self.size = len(members)
        self.architecture = members[0].architecture
        if len(members) == 1:
            self.single: Optional[nn.Module] = members[0].module
            return
        self.single = None
        modules = [m.module for m in members]
        self.modules = modules
        self.convolutional = any(isinstance(x, nn.modules.conv._ConvNd) for x in modules[0].modules())
        params, buffers = torch.func.stack_module_state(modules)
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        base = copy.deepcopy(modules[0]).to("meta")
        base.eval()

        def call(p, b, x):
            return torch.func.functional_call(base, (p, b), (x,))

        self._vmapped = torch.func.vmap(call, in_dims=(0, 0, None))

    def to(self, device: torch.device) -> "_StackedGroup":
        if self.single is not None:
            self.single.to(device)
        else:
            self.params = {k: v.to(device) for k, v in self.params.items()}
            self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def use_loop(self, x: torch.Tensor) -> bool:
        """Whether to run the members one after another instead of vmapped: on the CPU for members
        without convolutions, and for convolutional ones from ``LOOP_MIN_BATCH`` rows (see there).
        On CUDA always vmapped."""
        return x.device.type == "cpu" and (not self.convolutional or x.shape[0] >= LOOP_MIN_BATCH)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.single is not None:
            return self.single(x).unsqueeze(0)
        if self.use_loop(x):
            return torch.stack([m(x) for m in self.modules])
        return self._vmapped(self.params, self.buffers, x)


class _MCGroup:
    """MC-dropout samples of one model: seeded stochastic passes (Dropout on, BatchNorm eval)."""

    def __init__(self, module: nn.Module, seeds: List[int], positions: List[int], architecture: str):
        self.module, self.seeds, self.positions = module, seeds, positions
        self.size = len(seeds)
        self.architecture = architecture
        self.dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        if not self.dropouts:
            raise ServingError(f"MC-dropout members of {architecture} have no Dropout modules")

    def to(self, device: torch.device) -> "_MCGroup":
        self.module.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        gpus = [device.index or 0] if device.type == "cuda" else []
        out = []
        with _RNG_LOCK, torch.random.fork_rng(devices=gpus):
            try:
                for d in self.dropouts:
                    d.train()
                for seed in self.seeds:
                    torch.manual_seed(seed)
                    out.append(torch.cat([self.module(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]))
            finally:
                self.module.eval()
        return torch.stack(out)


# --------------------------------------------------------------------------- inputs


def as_input_tensor(x: Any, field: str = "inputs") -> torch.Tensor:
    """A float tensor from a tensor, NumPy array, pandas DataFrame or nested list of numbers.

    Raises :class:`ServingError` (naming ``field``) for ragged lists, non-numbers and
    values that cannot be converted.
    """
    if x is None:
        raise ServingError(f"{field} is missing", field)
    if hasattr(x, "to_numpy") and not isinstance(x, torch.Tensor):  # pandas DataFrame / Series
        try:
            x = x.to_numpy(dtype="float32")
        except Exception as exc:
            raise ServingError(f"{field} must hold only numbers ({str(exc).splitlines()[0]})", field) from None
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.tensor(x)  # a copy (NumPy arrays may be read-only)
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "expected sequence of length" in msg or "inhomogeneous" in msg:
                raise ServingError(f"{field} is ragged: every row must have the same length ({msg})", field) from None
            raise ServingError(f"{field} must be a (nested) list of numbers ({msg})", field) from None
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise ServingError(f"{field} must be real numbers, got {t.dtype}", field)
    wide = t
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        if wide.dtype == torch.float64 and bool(torch.isfinite(wide).all()):
            raise ServingError(f"{field} has values beyond float32's range (|x| > 3.4e38)", field)
        raise ServingError(f"{field} contain NaN or infinite values", field)
    return t


def _records(rows: Sequence[Mapping[str, Any]], field: str):
    """Rows given as ``{column: value}`` objects -> a pandas DataFrame (columns picked by name)."""
    import pandas as pd

    try:
        return pd.DataFrame.from_records(list(rows))
    except Exception as exc:
        raise ServingError(f"{field}: rows of column values cannot form a table ({str(exc).splitlines()[0]})",
                           field) from None


@dataclass
class MemberLogits:
    """Member logits ``[M, B, C]`` computed ahead (one forward of several requests' rows);
    :meth:`Ensemble.predict` takes them in place of inputs."""

    z: torch.Tensor


@dataclass
class Prediction:
    """The ensemble's answer for one batch (tensors on the CPU)."""

    labels: torch.Tensor            # [B] int64
    probabilities: torch.Tensor     # [B, C] (vote shares for "vote")
    agreement: torch.Tensor         # [B]
    member_probs: Optional[torch.Tensor] = field(default=None, metadata={"batch_axis": 1})  # [M, B, C] when asked
    calibrated: bool = False        # the probabilities were temperature-scaled
    uncertainty: Optional[Dict[str, torch.Tensor]] = None  # [B] each: entropy, expected_entropy, mutual_information
                                                            # (+ vote_share for vote), when asked

    def rows(self, start: int, stop: int) -> "Prediction":
        """The answer for rows ``start:stop`` of the batch: every tensor (and every tensor of a dict
        field) sliced along its batch axis (0, or the field's ``batch_axis`` metadata: a field whose
        batch axis is not the first must say so)."""
        def cut(v, axis):
            if isinstance(v, torch.Tensor):
                return v.narrow(axis, start, stop - start)
            if isinstance(v, dict):
                return {k: cut(t, axis) for k, t in v.items()}
            return v

        return type(self)(**{f.name: cut(getattr(self, f.name), f.metadata.get("batch_axis", 0))
                             for f in dataclasses.fields(self)})


# --------------------------------------------------------------------------- ensemble


@dataclass
class Ensemble:
    """A loaded ensemble, ready to predict. Build with :meth:`from_blobs` or :func:`load_ensemble_dir`."""

    members: List[Member]
    input_shape: Tuple[int, ...]
    num_classes: int
    meta: Dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        pre = self.meta.get("preprocessing")
        self.pipeline: Optional[Pipeline] = Pipeline.from_dict(pre) if pre else None
        names = self.meta.get("class_names")
        self.class_names: Optional[List[str]] = [str(n) for n in names] if names else None
        t = self.meta.get("temperature")
        self.temperature: Optional[float] = float(t) if t is not None else None
        self.groups: List[Union[_StackedGroup, _MCGroup]] = []
        stacked: Dict[str, List[int]] = {}
        mc: Dict[str, List[int]] = {}
        for pos, m in enumerate(self.members):
            if m.role == "mc_sample":
                mc.setdefault(m.key, []).append(pos)
            else:
                stacked.setdefault(_signature(m), []).append(pos)
        for positions in stacked.values():
            self.groups.append(_StackedGroup([self.members[p] for p in positions], positions))
        for positions in mc.values():
            first = self.members[positions[0]]
            self.groups.append(_MCGroup(first.module, [int(self.members[p].record["sample_seed"]) for p in positions],
                                        positions, first.architecture))
        for g in self.groups:
            g.to(self.device)
        stored = [m.record.get("weight") for m in self.members]
        self.stored_weights: Optional[torch.Tensor] = (
            torch.tensor([float(w) for w in stored], dtype=torch.float32) if all(w is not None for w in stored) else None)
        order = [p for g in self.groups for p in g.positions]
        self._inverse: Optional[torch.Tensor] = None  # None: the groups already hold the members in order
        if order != list(range(len(order))):
            self._inverse = torch.empty(len(order), dtype=torch.long)
            self._inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))

    # -- construction ------------------------------------------------------
    @classmethod
    def from_blobs(cls, blobs: Sequence[bytes], records: Optional[Sequence[Mapping[str, Any]]] = None,
                   meta: Optional[Mapping[str, Any]] = None, device: Union[str, torch.device] = "cpu") -> "Ensemble":
        """Rebuild members from their checkpoint blobs; ``records`` are manifest entries
        (:func:`member_record`; default: plain members indexed 0..M-1)."""
        if not blobs:
            raise ServingError("an ensemble needs at least one member")
        if records is not None and len(records) != len(blobs):
            raise ServingError(f"{len(blobs)} member blobs but {len(records)} member records")
        modules: Dict[str, Tuple[nn.Module, Dict[str, Any]]] = {}
        members: List[Member] = []
        for i, blob in enumerate(blobs):
            key = hashlib.sha256(blob).hexdigest()
            if key not in modules:
                try:
                    ckpt = artifact.read_member(blob)
                except artifact.ArtifactError as exc:
                    raise ServingError(str(exc)) from None
                modules[key] = (_build_module(ckpt), ckpt)
            module, ckpt = modules[key]
            if records is not None:
                rec = dict(records[i])
            else:
                try:
                    rec = artifact.member_record(i, model=ckpt["model"], blob_meta=ckpt)
                except artifact.ArtifactError as exc:
                    raise ServingError(str(exc)) from None
            rec.setdefault("architecture", model_architecture(ckpt["model"]))
            rec.setdefault("model", json.loads(json.dumps(dict(ckpt["model"]), default=str)))
            if rec.get("role") != "mc_sample":
                # deterministic members never share a module: stacking needs one module per member
                module = module if not any(m.module is module for m in members) else copy.deepcopy(module)
            members.append(Member(rec, module, dict(ckpt["model"]), tuple(int(s) for s in ckpt["input_shape"]),
                                  int(ckpt["num_classes"]), key))
        shapes = {m.input_shape for m in members}
        classes = {m.num_classes for m in members}
        if len(shapes) != 1 or len(classes) != 1:
            raise ServingError(f"members disagree on input shape / classes: {sorted(shapes)} / {sorted(classes)}")
        return cls(members, members[0].input_shape, members[0].num_classes, dict(meta or {}), torch.device(device))

    # -- description -------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.members)

    def architectures(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for m in self.members:
            out[m.architecture] = out.get(m.architecture, 0) + 1
        return out

    def describe_groups(self) -> List[Dict[str, Any]]:
        return [{"kind": "mc_dropout" if isinstance(g, _MCGroup) else ("stacked" if g.size > 1 else "single"),
                 "architecture": g.architecture, "members": [self.members[p].index for p in g.positions]}
                for g in self.groups]

    def default_weights(self) -> Optional[torch.Tensor]:
        """Weights of method ``weighted``: the ensemble's own (``stored_weights``), else proportional to
        the members' validation accuracy."""
        if self.stored_weights is not None:
            return self.stored_weights
        accs = [m.record.get("metrics", {}).get("val_acc") for m in self.members]
        if any(a is None for a in accs):
            return None
        return aggregation.weights_from_accuracy(torch.tensor(accs, dtype=torch.float64)).to(torch.float32)

    # -- inference ---------------------------------------------------------
    def prepare(self, x: Any, field: str = "inputs") -> torch.Tensor:
        """Model inputs ``[B, *input_shape]`` float32. With a preprocessing pipeline, ``x`` is raw
        (see ``Pipeline.accept``: arrays, DataFrames, image files); without one it is
        ``[B, *input_shape]`` or flattened ``[B, D]``."""
        if self.pipeline is not None:
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().numpy()
            elif isinstance(x, (list, tuple)) and x and all(isinstance(r, dict) for r in x):
                x = _records(x, field)  # a table's rows as {column: value} objects
            try:
                return torch.from_numpy(self.pipeline(x, field))
            except PreprocessError as exc:
                raise ServingError(str(exc), exc.field) from None
        t = as_input_tensor(x, field)
        shape, d = self.input_shape, math.prod(self.input_shape)
        if t.dim() == 0:
            raise ServingError(f"{field} must be a batch: shape [batch, {', '.join(map(str, shape))}] or [batch, {d}]", field)
        if t.shape[0] == 0:
            raise ServingError(f"{field} is an empty batch", field)
        if tuple(t.shape[1:]) == shape:
            return t
        if t.dim() == 2 and t.shape[1] == d:
            return t.reshape(t.shape[0], *shape)
        raise ServingError(
            f"{field} has shape {list(t.shape)}; expected [batch, {', '.join(map(str, shape))}] or [batch, {d}]", field)

    @property
    def batchable(self) -> bool:
        """Whether rows of different requests may share one forward: not for MC-dropout members,
        whose seeded masks depend on a row's position in the batch."""
        return not any(isinstance(g, _MCGroup) for g in self.groups)

    def logits(self, x: Any) -> torch.Tensor:
        """Member logits ``[M, B, C]`` (float32, CPU), members in ensemble order. ``x`` may be
        :class:`MemberLogits` a batched forward already computed (``api/batching.py``)."""
        if isinstance(x, MemberLogits):
            return x.z
        return self.forward(self.prepare(x))

    @torch.inference_mode()
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Member logits ``[M, B, C]`` (float32, CPU) of prepared model inputs ``t`` (:meth:`prepare`)."""
        t = t.to(self.device)
        outs = []
        for g in self.groups:
            chunks = [g(t[i:i + EVAL_BATCH]) for i in range(0, len(t), EVAL_BATCH)] \
                if isinstance(g, _StackedGroup) and len(t) > EVAL_BATCH else [g(t)]
            outs.append(torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0])
        z = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        if self._inverse is not None:
            z = z[self._inverse.to(z.device)]
        return z.float().cpu()

    def predict(self, x: Any, method: str = "mean", weights: Optional[Any] = None,
                return_members: bool = False, calibrated: Optional[bool] = None,
                return_uncertainty: bool = False) -> Prediction:
        """Combine the members' predictions for ``x`` with ``method`` (see the module docstring);
        ``calibrated`` (default: whether a temperature is stored) scales soft methods' probabilities."""
        if method not in aggregation.METHODS:
            raise ServingError(f"unknown method {method!r}; choose one of: {', '.join(aggregation.METHODS)}", "method")
        if calibrated and self.temperature is None:
            raise ServingError("this ensemble has no fitted temperature (it was trained with calibration=none)",
                               "calibrated")
        if weights is None and self.stored_weights is not None:
            weights = self.stored_weights
        if weights is None and method == "weighted":
            weights = self.default_weights()
            if weights is None:
                weights = torch.full((self.num_members,), 1.0 / self.num_members)
        if weights is not None:
            try:
                weights = aggregation.normalize_weights(weights, self.num_members)
            except aggregation.AggregationError as exc:
                raise ServingError(str(exc), "weights") from None
        z = self.logits(x)
        try:
            res = aggregation.aggregate(z, method=method, kind="logits", weights=weights,
                                        with_uncertainty=return_uncertainty)
        except aggregation.AggregationError as exc:  # e.g. outputs overflowed for extreme inputs
            raise ServingError(f"the members' outputs for these inputs cannot be combined: {exc}", "inputs") from None
        probs, scaled = res.probabilities, False
        if (self.temperature is not None if calibrated is None else calibrated) and method != "vote":
            probs, scaled = aggregation.temperature_scale(probs, self.temperature), True
        return Prediction(res.labels, probs, res.agreement, aggregation.softmax(z) if return_members else None,
                          scaled, res.uncertainty)



# --------------------------------------------------------------------------- on disk


def load_ensemble_dir(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Ensemble:
    """Load the ensemble directory ``ensemble_service.artifact.write_ensemble_dir`` wrote."""
    try:
        blobs, records, meta = artifact.read_ensemble_dir(path)
    except artifact.ArtifactError as exc:
        raise ServingError(str(exc)) from None
    return Ensemble.from_blobs(blobs, records, meta, device=device)
