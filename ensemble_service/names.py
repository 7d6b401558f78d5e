"""Metric, tag and artifact names, defined once: the runner and tracking write them, the CLI, the
API and the tests read them. Plain strings: no imports."""
from __future__ import annotations

from typing import Dict, Tuple

# -- the parent run: the ensemble on the test split ---------------------------------------------
ENSEMBLE_MEAN_TEST_ACC = "ensemble_mean_test_acc"
ENSEMBLE_VOTE_TEST_ACC = "ensemble_vote_test_acc"
ENSEMBLE_WEIGHTED_TEST_ACC = "ensemble_weighted_test_acc"
ENSEMBLE_LOGIT_MEAN_TEST_ACC = "ensemble_logit_mean_test_acc"
ENSEMBLE_MEAN_TEST_NLL = "ensemble_mean_test_nll"
ENSEMBLE_MEAN_TEST_BRIER = "ensemble_mean_test_brier"
ENSEMBLE_MEAN_TEST_ECE = "ensemble_mean_test_ece"
BEST_MEMBER_TEST_ACC = "best_member_test_acc"
MEAN_MEMBER_TEST_ACC = "mean_member_test_acc"
LAST_MEMBER_TEST_ACC = "last_member_test_acc"
LAST_MEMBER_TEST_NLL = "last_member_test_nll"
DISAGREEMENT = "disagreement"
ORACLE_TEST_ACC = "oracle_test_acc"
#: the accuracy and NLL of the ensemble of the first k members, step k
SIZE_CURVE_ACC = "ensemble_mean_test_acc_at_k"
SIZE_CURVE_NLL = "ensemble_mean_test_nll_at_k"
# bookkeeping on the parent run
WALL_SECONDS = "wall_seconds"
MEMBERS_FINISHED = "members_finished"
MEMBERS_PLANNED = "members_planned"
TRAIN_SECONDS_TOTAL = "train_seconds_total"
REGISTRATION_SECONDS = "registration_seconds"

#: ``metrics.ensemble_metrics`` key -> the parent run's metric
PARENT_METRIC_OF: Dict[str, str] = {
    "mean_acc": ENSEMBLE_MEAN_TEST_ACC, "vote_acc": ENSEMBLE_VOTE_TEST_ACC,
    "weighted_acc": ENSEMBLE_WEIGHTED_TEST_ACC, "logit_mean_acc": ENSEMBLE_LOGIT_MEAN_TEST_ACC,
    "mean_nll": ENSEMBLE_MEAN_TEST_NLL, "mean_brier": ENSEMBLE_MEAN_TEST_BRIER, "mean_ece": ENSEMBLE_MEAN_TEST_ECE,
    "best_member_acc": BEST_MEMBER_TEST_ACC, "mean_member_acc": MEAN_MEMBER_TEST_ACC,
    "disagreement": DISAGREEMENT, "oracle_acc": ORACLE_TEST_ACC,
}
#: every ensemble metric of the parent run
PARENT_METRICS: Tuple[str, ...] = tuple(PARENT_METRIC_OF.values()) + (LAST_MEMBER_TEST_ACC, LAST_MEMBER_TEST_NLL)

# -- member runs --------------------------------------------------------------------------------
TRAIN_LOSS = "train_loss"
VAL_ACC = "val_acc"
VAL_NLL = "val_nll"
LR = "lr"
#: logged once per epoch (step = epoch)
EPOCH_METRICS: Tuple[str, ...] = (TRAIN_LOSS, VAL_ACC, VAL_NLL, LR)
TEST_ACC = "test_acc"
TEST_NLL = "test_nll"
TEST_BRIER = "test_brier"
TEST_ECE = "test_ece"
#: logged once, at the end
FINAL_METRICS: Tuple[str, ...] = (TEST_ACC, TEST_NLL, TEST_BRIER, TEST_ECE)
TRAIN_SECONDS = "train_seconds"
#: the metric pair parent and member runs share, so that one column of the MLflow UI compares the
#: ensemble with its members: on the parent it is the ensemble's mean aggregation (parent metric -> shared name)
SHARED_METRIC_OF: Dict[str, str] = {ENSEMBLE_MEAN_TEST_ACC: TEST_ACC, ENSEMBLE_MEAN_TEST_NLL: TEST_NLL}

# -- tags ---------------------------------------------------------------------------------------
TAG_KIND = "ensemble.kind"                 # parent | member (runs); ensemble (registered models)
KIND_PARENT, KIND_MEMBER, KIND_ENSEMBLE = "parent", "member", "ensemble"
TAG_ID = "ensemble.id"
TAG_STRATEGY = "ensemble.strategy"
TAG_DATA = "ensemble.data"
TAG_MODEL = "ensemble.model"
TAG_MEMBERS = "ensemble.members"
TAG_TASKS = "ensemble.tasks"
TAG_DEGRADED = "ensemble.degraded"
TAG_ERROR = "ensemble.error"
TAG_REGISTERED_MODEL = "ensemble.registered_model"
TAG_MODEL_VERSION = "ensemble.model_version"
TAG_MEMBER_INDEX = "ensemble.member_index"
TAG_ARCHITECTURE = "ensemble.architecture"
TAG_ROLE = "ensemble.role"
TAG_TRAJECTORY = "ensemble.trajectory"
TAG_CYCLE = "ensemble.cycle"
TAG_HEAD = "ensemble.head"
TAG_SAMPLE = "ensemble.sample"
TAG_RESTARTS = "ensemble.restarts"
TAG_RESUMED_FROM = "ensemble.resumed_from_epoch"
TAG_DEVICE = "ensemble.device"
TAG_NODE_ID = "ensemble.node_id"
TAG_PID = "ensemble.pid"
TAG_HOST = "ensemble.host"
TAG_COLLECTED_EPOCH = "ensemble.collected_epoch"
TAG_SAMPLING = "ensemble.sampling"         # a member's dataset input: "bootstrap" (bagging) or "all"
# MLflow's own tags (the UI reads them)
MLFLOW_DESCRIPTION = "mlflow.note.content"           # a run's (or experiment's) markdown description
MLFLOW_DATA_CONTEXT = "mlflow.data.context"          # a dataset input's split: train, validation, test
MLFLOW_VIEW_PREFIX = "mlflow.sharedViewState."       # an experiment tag holding a saved view of its runs page

# -- artifacts ----------------------------------------------------------------------------------
MEMBER_CHECKPOINT = "checkpoint/member.pt"
VAL_PROBS = "predictions/val_probs.npy"
TEST_PROBS = "predictions/test_probs.npy"
TEST_LABELS = "predictions/test_labels.npy"
ENSEMBLE_TEST_PROBS = "predictions/ensemble_mean_test_probs.npy"
DATA_INFO = "data.json"
MEMBER_TABLE_CSV = "members.csv"
MEMBER_TABLE_JSON = "members.json"
PLOT_ACCURACY_VS_SIZE = "plots/accuracy_vs_size.png"
PLOT_RELIABILITY = "plots/reliability.png"
