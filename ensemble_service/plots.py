"""PNG figures logged on the parent run: accuracy vs ensemble size, reliability diagram.

Pure functions of tensors returning PNG bytes (matplotlib's Agg backend, no display).
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence

import torch

from ensemble_service import metrics


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def warm_up() -> None:
    """Import matplotlib and render one tiny figure, so the real plots later are fast."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1], [0, 1], "o-", label="x")
        ax.legend()
        _png(fig)
    except Exception:  # only an optimisation
        pass


def size_curve(member_probs: torch.Tensor, targets: torch.Tensor) -> Dict[str, List[float]]:
    """Test accuracy and NLL of the mean ensemble of the first k members, k = 1..N."""
    acc, nll = [], []
    for k in range(1, member_probs.shape[0] + 1):
        p = member_probs[:k].mean(0)
        acc.append(metrics.accuracy(p, targets))
        nll.append(metrics.nll(p, targets))
    return {"k": list(range(1, member_probs.shape[0] + 1)), "acc": acc, "nll": nll}


def accuracy_vs_size_png(curve: Dict[str, List[float]], member_accs: Sequence[float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(curve["k"], curve["acc"], "o-", label="ensemble of first k (mean)")
    ax[0].plot(range(1, len(member_accs) + 1), member_accs, "x", color="gray", label="member k alone")
    ax[0].set_xlabel("ensemble size k")
    ax[0].set_ylabel("test accuracy")
    ax[0].legend(fontsize=8)
    ax[1].plot(curve["k"], curve["nll"], "o-", color="tab:red")
    ax[1].set_xlabel("ensemble size k")
    ax[1].set_ylabel("test NLL")
    fig.suptitle(title)
    return _png(fig)


def reliability_png(ensemble_probs: torch.Tensor, best_probs: torch.Tensor, targets: torch.Tensor,
                    title: str, n_bins: int = 15, *, calibrated: Optional[torch.Tensor] = None,
                    temperature: Optional[float] = None) -> bytes:
    """The reliability diagram of the mean ensemble, of its best member and, when given, of the
    ensemble after temperature scaling (``calibrated``, with ``temperature``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    curves = [(ensemble_probs, "ensemble (mean)", "o-"), (best_probs, "best member", "s-")]
    if calibrated is not None:
        curves.insert(1, (calibrated, f"ensemble, T = {temperature:.2f}", "^-"))
    for probs, label, marker in curves:
        bins = metrics.reliability_bins(probs, targets, n_bins=n_bins)
        xs = [c for c, n in zip(bins["confidence"], bins["count"]) if n > 0]
        ys = [a for a, n in zip(bins["accuracy"], bins["count"]) if n > 0]
        ece = metrics.ece(probs, targets, n_bins=n_bins)
        ax.plot(xs, ys, marker, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel(f"confidence ({n_bins} bins)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    return _png(fig)
