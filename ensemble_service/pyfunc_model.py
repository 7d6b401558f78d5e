"""The MLflow pyfunc model of a registered ensemble.

``ensemble_service.registry.register_ensemble`` logs this file as a "model from code"
(MLflow executes it on load; no pickle) for each finished ensemble, with the artifact ``ensemble`` (the directory
``ensemble_service.artifact.write_ensemble_dir`` writes: ``manifest.json`` and the
members' checkpoints) and a copy of the ``ensemble_service`` package as its code, so in
any Python process with torch, numpy and mlflow::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/<name>@latest")   # or models:/<name>/<version>
    probs = model.predict(x)                                     # numpy [batch, classes]

``x`` is a NumPy array (or a torch tensor, or a nested list) of shape
``[batch, *input_shape]`` or flattened ``[batch, prod(input_shape)]``, or a pandas
DataFrame with one row per item and ``prod(input_shape)`` numeric columns (the flattened
input, in C order). The result is the ensemble's **mean**-aggregated probabilities,
float32 ``[batch, num_classes]``; ``params={"method": "vote" | "weighted" |
"logit_mean"}`` picks another method. An ensemble registered with a temperature (fitted on the
validation split, ``calibration=temperature``) answers temperature-scaled probabilities;
``params={"calibrated": False}`` answers the raw ones. Loading and inference are
``ensemble_service.serving`` (the HTTP API runs the same code).
"""
from __future__ import annotations

import os
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow.models  # noqa: E402
import numpy as np  # noqa: E402
import mlflow.pyfunc  # noqa: E402

#: name of the artifact (a directory) holding the ensemble
ARTIFACT = "ensemble"


class EnsemblePyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of :class:`ensemble_service.serving.Ensemble` (state lives in the artifact)."""

    def load_context(self, context) -> None:
        from ensemble_service.serving import load_ensemble_dir

        self.ensemble = load_ensemble_dir(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None):
        params = params or {}
        method = str(params.get("method") or "mean")
        calibrated = params.get("calibrated", True)
        if isinstance(calibrated, str):  # a params dict from JSON may carry the flag as text
            calibrated = calibrated.strip().lower() not in ("false", "0", "no")
        use = bool(calibrated) and self.ensemble.temperature is not None
        return self.ensemble.predict(model_input, method, calibrated=use).probabilities.numpy()


# The model is logged "from code" (MLflow executes this file when it loads the model, with the
# logged copy of ensemble_service on sys.path), so nothing is unpickled when it loads.
mlflow.models.set_model(EnsemblePyfunc())


def signature():
    """The logged signature: no input schema (inputs are checked by serving.Ensemble.prepare),
    optional params ``method`` (default ``mean``) and ``calibrated`` (default true: the stored
    temperature, when there is one)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([
        ParamSpec("method", "string", "mean"), ParamSpec("calibrated", "boolean", True)]))
