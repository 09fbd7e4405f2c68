"""The per-task figures logged to MLflow (matplotlib, headless)."""
from __future__ import annotations


def plot_accuracy_matrix(acc: list[list[float]], path: str) -> None:
    """The accuracy matrix as a heat map (PNG at ``path``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(acc)
    grid = np.full((n, n), np.nan)
    for i, row in enumerate(acc):
        grid[i, :len(row)] = 100 * np.asarray(row)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.5 * n))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 60 else "black")
    ax.set_xlabel("test set of task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy_curve(pooled: list[float], acc: list[list[float]], path: str) -> None:
    """Pooled accuracy, task-mean accuracy and each task's accuracy against the number of tasks learned (PNG
    at ``path``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = list(range(1, len(pooled) + 1))
    for j in range(len(acc)):
        ax.plot(xs[j:], [100 * acc[i][j] for i in range(j, len(acc))], lw=0.8, alpha=0.5)
    ax.plot(xs, [100 * p for p in pooled], "k-o", lw=2, label="pooled (all seen test images)")
    ax.plot(xs, [100 * sum(row) / len(row) for row in acc], "k--s", lw=1.2, ms=4, label="task-mean")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pooled_by_group(curves: dict[str, dict[str, tuple[list[float], list[float]]]], path: str) -> None:
    """Pooled accuracy (%) after each task, one line per group with a +-std band, one panel per benchmark
    (``{benchmark: {group: (means, stds)}}``, drawn in that order; PNG at ``path``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(5 * max(1, len(curves)), 3.6), squeeze=False)
    for ax, (benchmark, groups) in zip(axes[0], curves.items()):
        for group, (means, stds) in groups.items():
            xs, m, s = np.arange(1, len(means) + 1), np.asarray(means), np.asarray(stds)
            (line,) = ax.plot(xs, m, "-o", lw=1.8, ms=4, label=group)
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)
            ax.set_xticks(xs)
        ax.set_title(benchmark)
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("pooled accuracy (%), mean +- std")
        ax.set_ylim(0, 100)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
