"""Request and response bodies of the HTTP API (pydantic v2).

Nested numeric arrays (``inputs``, ``predictions``) are typed loosely here (a JSON array)
and checked by the routes (shape, raggedness, non-numbers, NaN/inf, limits), so every
problem gets one message naming the field instead of a cascade of union errors.
Everything else is strict: a number field takes no strings or booleans.
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["mean", "vote", "weighted", "logit_mean"]
Kind = Literal["probs", "logits", "labels"]
StrictNumber = Annotated[float, Field(strict=True)]

_NESTED = {"type": "array", "minItems": 1,
           "items": {"anyOf": [{"type": "number"}, {"type": "array", "items": {}}]}}
_EXAMPLE_INPUT = [[0.0] * 64]
_UNCERTAINTY_DOC = ("Also answer, per item, the members' predictive entropy H[mean p], expected entropy "
                    "mean_m H[p_m] (aleatoric) and their difference, the mutual information (epistemic), in nats "
                    "(with the request's weights); for method 'vote' also the label's vote share.")


class ErrorItem(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: ``detail`` is one line naming the field (``field``) at fault."""

    detail: str
    field: Optional[str] = None
    errors: Optional[List[ErrorItem]] = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": _EXAMPLE_INPUT, "method": "mean", "return_members": False}]})

    inputs: List[Any] = Field(
        ..., json_schema_extra=_NESTED,
        description="A batch of raw inputs in the training data's format (the ensemble applies its own "
                    "preprocessing): shape [batch, *raw_shape] or flattened [batch, prod(raw_shape)]; "
                    "GET /v1/ensembles/{name} says which.")
    method: Method = Field("mean", description="How member predictions are combined.")
    return_members: bool = Field(False, strict=True, description="Also return each member's probabilities.")
    weights: Optional[List[StrictNumber]] = Field(
        None, description="Per-member weights (finite, non-negative, one per member), used by every method "
                          "(a weighted vote, a weighted mean of logits); method 'mean' with weights is the "
                          "weighted mean and is answered as 'weighted'. Default: the ensemble's own "
                          "weights where it has them (a selection's, `ensemble select`), for every method; "
                          "else, for method 'weighted', proportional to the members' validation accuracy.")
    calibrated: Optional[bool] = Field(
        None, strict=True, description="Scale the probabilities of mean, weighted and logit_mean by the temperature "
                                       "fitted on the validation split (vote shares are never scaled). Default: "
                                       "true when the ensemble has one; true without one is a 422.")
    return_uncertainty: bool = Field(False, strict=True, description=_UNCERTAINTY_DOC)


class PredictResponse(BaseModel):
    name: str
    model_version: str = Field(..., description="The registered version that answered.")
    method: Method = Field(..., description="The method used ('weighted' for 'mean' with weights).")
    labels: List[int]
    probabilities: List[List[float]] = Field(..., description="[batch, classes]; vote shares for method 'vote'.")
    agreement: List[float] = Field(..., description="Fraction of members whose argmax equals the label.")
    class_names: Optional[List[str]] = Field(
        None, description="The name of each predicted label, when the ensemble's data set names its classes.")
    members: Optional[List[List[List[float]]]] = Field(
        None, description="[members, batch, classes] member probabilities (only with return_members).")
    calibrated: bool = Field(False, description="Whether the probabilities were temperature-scaled.")
    entropy: Optional[List[float]] = Field(None, description="Per item, H[mean p] in nats (return_uncertainty).")
    expected_entropy: Optional[List[float]] = Field(None, description="Per item, mean over members of H[p_m].")
    mutual_information: Optional[List[float]] = Field(None, description="Per item, entropy - expected_entropy.")
    vote_share: Optional[List[float]] = Field(None, description="Per item, the label's share of the votes (vote).")


class AggregateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"predictions": [[[0.7, 0.3]], [[0.4, 0.6]], [[0.9, 0.1]]], "kind": "probs", "method": "vote"},
        {"predictions": [[0, 2, 1], [0, 1, 1]], "kind": "labels", "method": "vote", "num_classes": 3},
    ]})

    predictions: List[Any] = Field(
        ..., json_schema_extra=_NESTED,
        description="members x batch x classes (probs, logits) or members x batch (labels).")
    kind: Kind = "probs"
    method: Optional[Method] = Field(
        None, description="How member predictions are combined. Omitted (or null): 'vote' for kind 'labels', "
                          "'mean' otherwise. Labels can only be voted ('vote', or 'weighted': a weighted vote).")
    weights: Optional[List[StrictNumber]] = Field(
        None, description="Per-member weights (finite, non-negative, one per member; required for 'weighted'), "
                          "used by every method (a weighted vote, a weighted mean of logits); method 'mean' with "
                          "weights is the weighted mean and is answered as 'weighted'.")
    num_classes: Optional[int] = Field(None, strict=True, ge=1, description="Required for labels.")
    return_uncertainty: bool = Field(False, strict=True, description=_UNCERTAINTY_DOC + " Labels get vote_share only.")


class AggregateResponse(BaseModel):
    method: Method = Field(..., description="The method used: the default for the kind when none was given, "
                                            "'weighted' for 'mean' with weights.")
    kind: Kind
    labels: List[int]
    probabilities: List[List[float]] = Field(..., description="[batch, classes]; vote shares for method 'vote'.")
    agreement: List[float]
    entropy: Optional[List[float]] = None
    expected_entropy: Optional[List[float]] = None
    mutual_information: Optional[List[float]] = None
    vote_share: Optional[List[float]] = None


class Health(BaseModel):
    status: Literal["ok"]
    tracking_uri: str
    cached_ensembles: int
    store: Literal["ok", "unavailable"] = Field(..., description="Whether the tracking store can be read now.")
    store_detail: Optional[str] = Field(None, description="Why the store is unavailable.")


class VersionSummary(BaseModel):
    version: str
    aliases: List[str]
    run_id: Optional[str] = None
    created: int = Field(..., description="Creation time, milliseconds since the epoch.")
    status: Optional[str] = None
    strategy: Optional[str] = None
    members: Optional[int] = None


class EnsembleSummary(BaseModel):
    name: str
    latest_version: Optional[str] = None
    aliases: Dict[str, str] = Field(..., description="alias -> version ('latest' is the newest version).")
    versions: List[VersionSummary]


class EnsembleList(BaseModel):
    ensembles: List[EnsembleSummary]


class MemberDescription(BaseModel):
    index: int
    architecture: str
    role: str
    model: Dict[str, Any]
    metrics: Dict[str, float]
    sample_seed: Optional[int] = None
    weight: Optional[float] = Field(None, description="The member's aggregation weight, where the ensemble has "
                                                      "weights (a selection's share of the picks).")


class GroupDescription(BaseModel):
    kind: Literal["stacked", "single", "mc_dropout"]
    architecture: str
    members: List[int]


class EnsembleInfo(BaseModel):
    name: str
    version: str
    aliases: List[str]
    run_id: Optional[str] = Field(None, description="The parent run of the ensemble.")
    created: int
    strategy: Optional[str] = None
    data: Optional[str] = None
    num_members: int
    input_shape: List[int]
    num_classes: int
    class_names: Optional[List[str]] = None
    inputs: Dict[str, Any] = Field(..., description="What predict takes: kind (array, table, image), shape (per "
                                                     "item, raw), columns (tables), image (size, channels) and the "
                                                     "preprocessing the ensemble applies.")
    architectures: Dict[str, int]
    members: List[MemberDescription]
    groups: List[GroupDescription] = Field(..., description="How members run: stacked (one vmapped forward), "
                                                            "single, or mc_dropout (seeded stochastic passes).")
    metrics: Dict[str, float] = Field(..., description="The parent run's ensemble metrics.")
    methods: List[Method]
