"""PNG figures of a run for the report card: one loss-curve chart per training phase and the emotion confusion
matrix. The same data always gives the same bytes (Agg canvas, bundled fonts, no software or date in the
PNG metadata), so the figures reproduce like every other output; each file is written atomically."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from persona_lm.io import atomic_path

DPI = 100
CURVE_SIZE = (7.0, 4.0)  # inches: 700 x 400 pixels
METADATA = {"Software": None}  # matplotlib's only default PNG key; it names the version, which would vary the bytes


@dataclass
class Curve:
    label: str  # what the values are, e.g. "val loss (emotion CE + 0.5 × LM CE)"
    steps: list[int]
    values: list[float]
    dashed: bool = False


def confusion_size(n_labels: int) -> tuple[float, float]:
    """Inches: grows with the label count so every cell keeps room for its number."""
    side = max(4.0, 1.6 + 0.5 * n_labels)
    return side + 1.0, side


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    # A bare Figure draws on its own Agg canvas: no pyplot state, no GUI backend, whatever MPLBACKEND says.
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _save(fig, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=METADATA)
    return out


def training_curves(curves: list[Curve], title: str, out: Path) -> Path:
    """Loss against optimizer step, one labelled line per curve."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(CURVE_SIZE)
    ax = fig.add_subplot()
    for c in curves:
        ax.plot(c.steps, c.values, label=c.label, linestyle="--" if c.dashed else "-",
                linewidth=1.0 if c.dashed else 1.6, marker="." if len(c.steps) < 30 else None)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def tournament_curves(curves: dict[str, tuple[list[int], list[float]]], title: str, out: Path) -> Path:
    """Val loss at the end of each round a candidate ran, one line per candidate: a line that stops early is a
    candidate eliminated there."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(CURVE_SIZE)
    ax = fig.add_subplot()
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name, marker="o", linewidth=1.4)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step (end of round)")
    ax.set_ylabel("val loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small", ncol=2)
    return _save(fig, out)


def confusion_grid(pairs: list[dict], labels: list[str]) -> tuple[list[str], list[list[int]], list[list[float]]]:
    """(labels, counts[actual][predicted], each row's counts as shares of the row). Labels outside `labels`
    that occur in `pairs` are appended, so no pair is dropped."""
    labels = list(labels) + sorted({x for r in pairs for x in (r["actual"], r["predicted"])} - set(labels))
    counts = Counter((r["actual"], r["predicted"]) for r in pairs)
    grid = [[counts[(a, p)] for p in labels] for a in labels]
    return labels, grid, [[n / (sum(row) or 1) for n in row] for row in grid]


def confusion_matrix(pairs: list[dict], labels: list[str], out: Path) -> Path:
    """Rows are the actual emotion, normalised to sum to 1 (the colour); each cell is annotated with its count."""
    labels, grid, share = confusion_grid(pairs, labels)
    fig = _figure(confusion_size(len(labels)))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i, row in enumerate(grid):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", fontsize="small",
                    color="white" if share[i][j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted emotion")
    ax.set_ylabel("actual emotion")
    ax.set_title(f"Emotion confusion ({len(pairs)} val replies)")
    fig.colorbar(image, ax=ax, label="share of the actual emotion's replies")
    return _save(fig, out)
