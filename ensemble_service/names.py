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

# calibration (calibration=temperature): the temperature fitted on the validation split, the test split scaled
ENSEMBLE_TEMPERATURE = "ensemble_temperature"
ENSEMBLE_CALIBRATED_TEST_NLL = "ensemble_calibrated_test_nll"
ENSEMBLE_CALIBRATED_TEST_ECE = "ensemble_calibrated_test_ece"
# uncertainty on the test split (ensemble_service/evaluation.py): mean per-item predictive entropy and mutual
# information; selective classification and misclassification detection ranking by each; the OOD check
ENSEMBLE_MEAN_TEST_ENTROPY = "ensemble_mean_test_entropy"
ENSEMBLE_MEAN_TEST_MI = "ensemble_mean_test_mi"
AURC_ENTROPY = "aurc_entropy"
AURC_MI = "aurc_mi"
SELECTIVE_ACC_90_ENTROPY = "selective_acc_at_90_entropy"
SELECTIVE_ACC_90_MI = "selective_acc_at_90_mi"
MISCLASSIFICATION_AUROC_ENTROPY = "misclassification_auroc_entropy"
MISCLASSIFICATION_AUROC_MI = "misclassification_auroc_mi"
OOD_AUROC_ENTROPY = "ood_auroc_entropy"
OOD_AUROC_MI = "ood_auroc_mi"
#: calibration and uncertainty metrics of the parent run (each only where defined: no temperature with
#: calibration=none, no misclassification AUROC when the ensemble gets every test item right)
QUALITY_METRICS: Tuple[str, ...] = (
    ENSEMBLE_TEMPERATURE, ENSEMBLE_CALIBRATED_TEST_NLL, ENSEMBLE_CALIBRATED_TEST_ECE, ENSEMBLE_MEAN_TEST_ENTROPY,
    ENSEMBLE_MEAN_TEST_MI, AURC_ENTROPY, AURC_MI, SELECTIVE_ACC_90_ENTROPY, SELECTIVE_ACC_90_MI,
    MISCLASSIFICATION_AUROC_ENTROPY, MISCLASSIFICATION_AUROC_MI, OOD_AUROC_ENTROPY, OOD_AUROC_MI)

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
