"""Pictures of the labs as PNG files (matplotlib, Agg backend: no display needed).

The stages draw them as they run: preprocess writes `samples.png` (a grid of labelled images)
beside `summary.json`; evaluate writes `learning_curves.png`, `confusion.png` and
`train_inputs.png` (training images as the input pipeline feeds them, augmented or not) to
`eval/<lab>/` and logs them to the lab's MLflow run; `dlilabs.compare` draws the labs side by
side. Figures are built with `matplotlib.figure.Figure`, not pyplot, so nothing is kept in a
global figure registry between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before any backend is picked: stages run headless, under DVC or SLURM

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dlilabs.ground.io import atomic_path, reading  # noqa: E402

DPI = 100
# The history.csv columns the learning curves read.
HISTORY = "epoch, train_accuracy, val_accuracy, train_loss, val_loss"
TRAIN, VAL, GAP, BEST = "tab:blue", "tab:orange", "tab:red", "tab:green"


def save(figure: Figure, path: str | Path) -> Path:
    """Write `figure` to `path` as a PNG, atomically (DVC never sees half a file)."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, bbox_inches="tight")
    return path


def learning_curves(history: pd.DataFrame, best_epoch: int | None, title: str) -> Figure:
    """Accuracy and loss per epoch, train vs validation, the gap between them shaded and the
    best epoch marked. `history` has one row per epoch: `epoch` (1-based), `train_accuracy`,
    `val_accuracy`, `train_loss`, `val_loss` (the train stage's history.csv)."""
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2, sharex=True)
    epochs = history["epoch"].to_numpy()
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        train, val = history[f"train_{metric}"], history[f"val_{metric}"]
        # Markers: a 1-epoch demo run is a single point, which a bare line would not show.
        ax.plot(epochs, train, "o-", color=TRAIN, label=f"train {metric}")
        ax.plot(epochs, val, "o-", color=VAL, label=f"validation {metric}")
        gap = "train - validation" if metric == "accuracy" else "validation - train"
        if len(epochs) > 1:
            ax.fill_between(epochs, train, val, color=GAP, alpha=0.15, label=f"gap ({gap})")
        else:  # one epoch (the demo): a band has no width, so draw the gap as a bar
            ax.vlines(epochs, train, val, color=GAP, alpha=0.3, linewidth=12, label=f"gap ({gap})")
        if best_epoch:
            best_value = history.loc[history["epoch"] == best_epoch, f"val_{metric}"]
            ax.axvline(
                best_epoch,
                color=BEST,
                linestyle="--",
                linewidth=1,
                label=f"best epoch {best_epoch}",
            )
            if len(best_value):
                # Hollow, so the validation point it marks stays visible inside it.
                ax.plot(
                    [best_epoch],
                    best_value,
                    "*",
                    color=BEST,
                    markersize=16,
                    markerfacecolor="none",
                    markeredgewidth=1.5,
                )
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        # Whole epochs only, with room around them (one epoch would get ticks 0.96..1.04).
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def confusion(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Confusion matrix (classes, classes), rows = actual class, as a heat map of each row's
    share (so rare classes are as readable as common ones) with the counts written in."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = 3 + 0.32 * len(class_names)
    figure = Figure(figsize=(size + 1, size))
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, labels=class_names)
    ax.set_yticks(ticks, labels=class_names)
    ax.set(xlabel="predicted class", ylabel="actual class", title=title)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            color = "white" if shares[row, column] > 0.5 else "black"
            ax.text(column, row, str(count), ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    return figure


def image_grid(rows: Sequence[np.ndarray], captions: Sequence[Sequence[str]], title: str) -> Figure:
    """Images laid out as given: `rows` is a list of arrays (columns, 28, 28) (uint8 0-255 or
    float 0-1), `captions[r][c]` the text above image c of row r."""
    columns = max(len(row) for row in rows)
    figure = Figure(figsize=(1.3 * columns, 1.5 * len(rows) + 0.6))
    axes = np.atleast_2d(figure.subplots(len(rows), columns, squeeze=False))
    for r, (images, texts) in enumerate(zip(rows, captions, strict=True)):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                vmax = 255 if images[c].dtype == np.uint8 else 1.0
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=vmax)
                ax.set_title(texts[c], fontsize=9)
    figure.suptitle(title)
    return figure


def pick_samples(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices (<= count,) of images to show: the first image of every class present, in class
    order, then random others, so a grid shows each class at least once when it fits."""
    firsts = np.unique(labels, return_index=True)[1]
    rest = np.setdiff1d(np.arange(len(labels)), firsts)
    extra = np.random.default_rng(seed).permutation(rest)[: max(0, count - len(firsts))]
    return np.concatenate([firsts, extra])[:count].astype(int)


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str,
    count: int = 32,
    columns: int = 8,
) -> Figure:
    """Grid of up to `count` images (n, 28, 28) uint8 captioned with their class names."""
    chosen = pick_samples(labels, count)
    rows = [chosen[start : start + columns] for start in range(0, len(chosen), columns)]
    return image_grid(
        [images[row] for row in rows],
        [[str(class_names[labels[i]]) for i in row] for row in rows],
        title,
    )


def augmented_batches(
    images: np.ndarray, labels: np.ndarray, num_classes: int, augment_cfg, seed: int, draws: int = 3
) -> list[np.ndarray]:
    """The real input pipeline (dlilabs.core.data) run `draws` times over `images` (n, 28, 28)
    uint8: a list of `draws` float arrays (n, 28, 28) in [0, 1], as the model's first layer
    sees them (the pipeline feeds raw pixels; the model divides by 255)."""
    from dlilabs.core.data import build_augmenter, make_dataset

    dataset = make_dataset(
        images,
        labels,
        num_classes,
        batch_size=len(images),
        augmenter=build_augmenter(augment_cfg, seed),
    )
    # Each pass draws fresh random transforms, as each training epoch does.
    return [next(iter(dataset))[0].numpy() / 255.0 for _ in range(draws)]


def train_inputs_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    augment_cfg,
    seed: int,
    columns: int = 8,
    draws: int = 3,
) -> Figure:
    """What the lab's input pipeline feeds the model: the top row holds `columns` training
    images (n, 28, 28) as stored, each row below one pass of the pipeline over them (`draws`
    passes of random transforms; a single row when `augment_cfg.name` is "none")."""
    chosen = pick_samples(labels, columns)
    names = [str(class_names[labels[i]]) for i in chosen]
    if augment_cfg.name == "none":  # every pass would repeat the stored images
        return image_grid([images[chosen]], [names], "training inputs (augment=none: as stored)")
    batches = augmented_batches(
        images[chosen], labels[chosen], len(class_names), augment_cfg, seed, draws
    )
    title = f"training inputs: stored (top), then {draws} passes of augment={augment_cfg.name}"
    return image_grid([images[chosen], *batches], [names] * (draws + 1), title)


def comparison(table: pd.DataFrame) -> Figure:
    """Grouped bars per run: best and final validation accuracy and the last epoch's gap.
    `table` has columns `label`, `best_val_accuracy`, `final_val_accuracy`,
    `final_gap_accuracy` (one row per run, in display order)."""
    bars = (
        ("best_val_accuracy", "best validation accuracy", VAL),
        ("final_val_accuracy", "final validation accuracy", TRAIN),
        ("final_gap_accuracy", "gap at the last epoch (train - val)", GAP),
    )
    positions = np.arange(len(table))
    width = 0.27
    figure = Figure(figsize=(max(7.0, 2.2 * len(table)), 4.8))
    ax = figure.subplots()
    for offset, (column, label, color) in zip((-width, 0, width), bars, strict=True):
        values = table[column].to_numpy(dtype=float)
        drawn = ax.bar(positions + offset, values, width, label=label, color=color)
        ax.bar_label(drawn, labels=[f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(positions, labels=table["label"])
    ax.set_ylim(min(0.0, float(table["final_gap_accuracy"].min()) - 0.05), 1.1)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel="accuracy", title="Validation accuracy and overfitting gap, lab by lab")
    ax.legend(fontsize=8, loc="upper left", ncols=3)
    ax.grid(axis="y", alpha=0.3)
    return figure


def write_samples(
    out_dir: str | Path,
    split: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    dataset: str,
) -> Path:
    """Preprocess hook: `out_dir/samples.png` from the training split (x (n, 28, 28), y (n,))."""
    images, labels = split
    figure = sample_grid(images, labels, class_names, f"{dataset}: training samples")
    return save(figure, Path(out_dir) / "samples.png")


def write_eval_figures(
    cfg,
    matrix: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    val_accuracy: float,
    best_epoch: float | None,
) -> list[Path]:
    """Evaluate hook: learning_curves.png, confusion.png and train_inputs.png in
    `cfg.paths.eval_dir`, from the train stage's history.csv and best epoch (run.json), the
    validation confusion matrix (classes, classes) and the training split (x (n, 28, 28), y
    (n,)). Returns the PNGs to log to the run: those, plus the dataset's samples.png when the
    preprocess stage wrote one."""
    model_dir, eval_dir = Path(cfg.paths.model_dir), Path(cfg.paths.eval_dir)
    history_file = model_dir / "history.csv"
    with reading(history_file, f"train@{cfg.lab}", "history CSV with columns " + HISTORY):
        history = pd.read_csv(history_file)
        missing = [column for column in HISTORY.split(", ") if column not in history]
        if missing or history.empty:
            raise ValueError(f"no column {', '.join(missing)}" if missing else "no rows")
    if not best_epoch:  # run.json of an older train stage: the best validation accuracy
        best_epoch = history.loc[history["val_accuracy"].idxmax(), "epoch"]
    names = [str(name) for name in cfg.dataset.class_names]
    written = [
        save(
            learning_curves(history, int(best_epoch), f"{cfg.lab}: learning curves"),
            eval_dir / "learning_curves.png",
        ),
        save(
            confusion(
                matrix, names, f"{cfg.lab}: validation confusion (accuracy {val_accuracy:.3f})"
            ),
            eval_dir / "confusion.png",
        ),
        save(
            train_inputs_grid(*train, names, cfg.augment, cfg.trainer.seed),
            eval_dir / "train_inputs.png",
        ),
    ]
    samples = Path(cfg.paths.prepared_dir) / "samples.png"
    return written + ([samples] if samples.is_file() else [])
