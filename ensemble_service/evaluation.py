"""The ensemble's calibration and uncertainty, as the parent run records them (pure torch, no MLflow).

:func:`quality` is what ``runner.summarize`` adds to the accuracy metrics, from the members' results:

* calibration (``calibration=temperature``, the default): one temperature fitted on the validation
  split to the mean ensemble's probabilities (``metrics.fit_temperature``: L-BFGS on the NLL of
  ``softmax(ln p_bar / T)``), and the test split's NLL and ECE once scaled; the temperature is stored
  with the registered model (serving applies it);
* uncertainty (``metrics.uncertainty_metrics``): per test item the predictive entropy and the mutual
  information of the members; how well each ranks the ensemble's errors (AURC, accuracy at 90%
  coverage, misclassification AUROC) and out-of-distribution inputs (:func:`ood_inputs`) against the
  test inputs (AUROC).

The out-of-distribution inputs are the test inputs (the first :data:`OOD_ITEMS`) with their
features shuffled: each item's values (pixels, signal samples, table cells) in a random order of its
own (seeded), so every item keeps its own values and loses its structure. The members run on them
rebuilt from their checkpoints (``serving.Ensemble``, as the endpoint runs them). A streamed data
set (``data=parquet``) keeps its test inputs out of the driver: its runs have no OOD AUROCs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ensemble_service import aggregation, artifact, metrics, names

#: how many test items the out-of-distribution check shuffles (at most)
OOD_ITEMS = 1000
OOD_SEED = 0

#: ``metrics.calibration_metrics`` / ``metrics.uncertainty_metrics`` key -> the parent run's metric
METRIC_OF: Dict[str, str] = {
    "temperature": names.ENSEMBLE_TEMPERATURE, "calibrated_nll": names.ENSEMBLE_CALIBRATED_TEST_NLL,
    "calibrated_ece": names.ENSEMBLE_CALIBRATED_TEST_ECE,
    "mean_entropy": names.ENSEMBLE_MEAN_TEST_ENTROPY, "mean_mi": names.ENSEMBLE_MEAN_TEST_MI,
    "aurc_entropy": names.AURC_ENTROPY, "aurc_mi": names.AURC_MI,
    "selective_acc_at_90_entropy": names.SELECTIVE_ACC_90_ENTROPY, "selective_acc_at_90_mi": names.SELECTIVE_ACC_90_MI,
    "misclassification_auroc_entropy": names.MISCLASSIFICATION_AUROC_ENTROPY,
    "misclassification_auroc_mi": names.MISCLASSIFICATION_AUROC_MI,
    "ood_auroc_entropy": names.OOD_AUROC_ENTROPY, "ood_auroc_mi": names.OOD_AUROC_MI,
}


def ood_inputs(x: torch.Tensor, seed: int = OOD_SEED, limit: int = OOD_ITEMS) -> torch.Tensor:
    """The first ``limit`` items of ``x`` ``[B, ...]``, each with its features in its own random order."""
    x = x[:limit]
    flat = x.reshape(len(x), -1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(flat.shape, generator=gen), dim=1)
    return flat.gather(1, order).reshape(x.shape)


def member_probs_on(results, x: torch.Tensor) -> torch.Tensor:
    """``[M, B, C]`` probabilities of the members (in index order) on model inputs ``x``, rebuilt from
    their checkpoints as serving rebuilds them (MC-dropout samples with their own seeds)."""
    from ensemble_service.serving import Ensemble

    results = sorted(results, key=lambda r: r.index)
    records = [artifact.member_record(r.index, r.architecture, r.model, r.metrics, r.extra,
                                      blob_meta=artifact.read_member(r.weights)) for r in results]
    ensemble = Ensemble.from_blobs([r.weights for r in results], records)
    return ensemble.logits(x).softmax(-1)


@dataclass
class Quality:
    metrics: Dict[str, float]                       # the parent run's metric names -> finite values
    temperature: Optional[float]                    # None with calibration=none
    calibrated_probs: Optional[torch.Tensor]        # [B, C] the scaled mean ensemble on the test split


def quality(results, data, calibration: str = "temperature") -> Quality:
    """Calibration and uncertainty metrics of the mean ensemble of ``results`` on ``data``'s splits."""
    results = sorted(results, key=lambda r: r.index)
    val = torch.stack([torch.as_tensor(r.val_probs) for r in results])
    test = torch.stack([torch.as_tensor(r.test_probs) for r in results])
    values: Dict[str, float] = {}
    temperature, calibrated = None, None
    if calibration == "temperature":
        cal = metrics.calibration_metrics(val.mean(0), data.y_val, test.mean(0), data.y_test)
        values.update(cal)
        temperature = cal["temperature"]
        calibrated = aggregation.temperature_scale(test.mean(0), temperature)
    # a streamed data set's test inputs are not on the driver: no OOD check there
    x_test = getattr(data, "x_test", None)
    ood = member_probs_on(results, ood_inputs(x_test)) if x_test is not None else None
    values.update(metrics.uncertainty_metrics(test, data.y_test, ood))
    out = {METRIC_OF[k]: float(v) for k, v in values.items() if k in METRIC_OF and math.isfinite(v)}
    return Quality(out, temperature, calibrated)
