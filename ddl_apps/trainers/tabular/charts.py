"""The charts a scoring team reads: cumulative gains (how many positives the top-scored rows hold) and
calibration (whether a score of 0.3 means a 30 % chance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(5.5, 5))


def gains_chart(label: np.ndarray, scores: dict[str, np.ndarray], path: Path) -> None:
    """Share of all positives found against the share of rows taken, highest score first, per scorer."""
    plt, fig, ax = _figure()
    shares = np.arange(len(label) + 1) / len(label)
    for name, score in scores.items():
        found = np.concatenate([[0], np.cumsum(label[np.argsort(-score, kind="stable")])]) / label.sum()
        ax.plot(shares, found, label=name)
    ax.plot([0, label.mean(), 1], [0, 1, 1], ":", color="grey", label="perfect")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random")
    ax.axvline(0.1, color="lightgrey", lw=0.8)
    ax.set(xlabel="share of rows taken (highest score first)", ylabel="share of positives found",
           title="cumulative gains (test)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def calibration_plot(label: np.ndarray, scores: dict[str, np.ndarray], path: Path, bins: int = 10) -> None:
    """Observed share of positives against the mean score, in `bins` groups of equal size, per scorer."""
    from sklearn.calibration import calibration_curve

    plt, fig, ax = _figure()
    for name, score in scores.items():
        observed, predicted = calibration_curve(label, score, n_bins=bins, strategy="quantile")
        ax.plot(predicted, observed, "o-", label=name, ms=3)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.set(xlabel="mean score", ylabel="observed share of positives", title=f"calibration (test, {bins} bins)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
