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

# -- a selection's parent run (`ensemble select`): the selection and its pool on the validation split
ENSEMBLE_MEAN_VAL_NLL = "ensemble_mean_val_nll"      # the selected (count-weighted) ensemble
ENSEMBLE_MEAN_VAL_ACC = "ensemble_mean_val_acc"
BEST_MEMBER_VAL_NLL = "best_member_val_nll"          # the pool's best member
BEST_MEMBER_VAL_ACC = "best_member_val_acc"
POOL_MEAN_VAL_NLL = "pool_mean_val_nll"              # the whole pool averaged
POOL_MEAN_VAL_ACC = "pool_mean_val_acc"
POOL_MEAN_TEST_NLL = "pool_mean_test_nll"
POOL_MEAN_TEST_ACC = "pool_mean_test_acc"
POOL_SIZE = "pool_size"
SELECTION_PICKS = "selection_picks"                  # members picked (with repetitions) = the weights' denominator
#: the validation NLL and accuracy of the greedy path's ensemble after step k (step k)
SELECTION_VAL_NLL_AT_K = "selection_val_nll_at_k"
SELECTION_VAL_ACC_AT_K = "selection_val_acc_at_k"

# -- a distilled student's run (`ensemble distill`): the student's own metrics are the member's
TEACHER_TEST_ACC = "teacher_test_acc"
TEACHER_TEST_NLL = "teacher_test_nll"
TEACHER_TEST_ECE = "teacher_test_ece"
BASELINE_TEST_ACC = "baseline_test_acc"              # the student's architecture trained alone on the labels
BASELINE_TEST_NLL = "baseline_test_nll"
BASELINE_TEST_ECE = "baseline_test_ece"
TEACHER_FORWARD_SECONDS = "teacher_forward_seconds"  # one forward over the test split
STUDENT_FORWARD_SECONDS = "student_forward_seconds"
FORWARD_TIME_RATIO = "forward_time_ratio"            # teacher / student
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
#: the metric pair parent and member runs share, so that one column of the MLflow UI compares the
#: ensemble with its members: on the parent it is the ensemble's mean aggregation (parent metric -> shared name)
SHARED_METRIC_OF: Dict[str, str] = {ENSEMBLE_MEAN_TEST_ACC: TEST_ACC, ENSEMBLE_MEAN_TEST_NLL: TEST_NLL}

# -- tags ---------------------------------------------------------------------------------------
TAG_KIND = "ensemble.kind"                 # parent | member (runs); ensemble (registered models)
KIND_PARENT, KIND_MEMBER, KIND_ENSEMBLE = "parent", "member", "ensemble"
KIND_STUDENT = "student"                   # a distilled student's run (top-level, like a parent)
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
TAG_SWEEP = "ensemble.sweep"                         # parent runs of one `submit --multirun` (tracking.sweep)
TAG_GROWN_FROM = "ensemble.grown_from"               # `ensemble grow`: the grown ensemble's parent run
TAG_GROWN_FROM_VERSION = "ensemble.grown_from_version"   # ... and its registered version (name/versions/N)
TAG_REUSED_MEMBERS = "ensemble.reused_members"       # member run ids reused, comma-separated, in member order
TAG_SELECTED_FROM = "ensemble.selected_from"         # `ensemble select`: the pool's sources
TAG_SELECTED_MEMBERS = "ensemble.selected_members"   # run_id:count,... in member order
TAG_DISTILLED_FROM = "ensemble.distilled_from"       # `ensemble distill`: the teacher's parent run
TAG_DISTILLED_FROM_VERSION = "ensemble.distilled_from_version"
ROLE_STUDENT, ROLE_BASELINE = "student", "baseline"
STRATEGY_SELECTION, STRATEGY_DISTILLED = "selection", "distilled"   # ensemble.strategy of those runs
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
VAL_LABELS = "predictions/val_labels.npy"
CONFIG_YAML = "config.yaml"
SELECTION_JSON = "selection.json"          # a selection's pool, picks, counts and weights
DISTILLATION_JSON = "distillation.json"    # student vs teacher vs baseline, forward times
ENSEMBLE_TEST_PROBS = "predictions/ensemble_mean_test_probs.npy"
DATA_INFO = "data.json"
MEMBER_TABLE_CSV = "members.csv"
MEMBER_TABLE_JSON = "members.json"
PLOT_ACCURACY_VS_SIZE = "plots/accuracy_vs_size.png"
PLOT_RELIABILITY = "plots/reliability.png"
