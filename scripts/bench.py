"""`make bench`: speed and memory of the pipeline's hot spots, measured side by side.

    python scripts/bench.py               # every section
    python scripts/bench.py preprocess    # one section (preprocess, train, search, overhead,
                                          # demo; repro, ~35 min, runs only when named)

Each section is a function returning `Row`s; a row prints as
`label: 1.23 s (target <= 3 s, ratio 0.41) | peak RSS 612 MB (target <= 1024 MB, ratio 0.60)`.
Add a section by writing such a function and listing it in SECTIONS. The script exits 1
when any measure misses its target.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from benchrows import Measure, Row  # scripts/: shared with bench_search.py

# Measurements run in a fresh interpreter (`run_child`), so each peak RSS is that run's own
# and includes what pyarrow or TensorFlow allocate outside Python's heap (tracemalloc cannot
# see that). The child reads its own high-water mark, VmHWM: ru_maxrss survives fork+exec (a
# child of this big parent would start at the parent's peak) and RUSAGE_CHILDREN is the
# maximum over all children so far, so neither can tell two runs apart.
CHILD_PRELUDE = """
import json, resource, sys, time

def peak_mb():
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss is KiB (bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)
"""


def run_child(code: str, *args: str) -> dict:
    """Run CHILD_PRELUDE + `code` in a fresh interpreter; return the JSON it prints last."""
    command = [sys.executable, "-c", CHILD_PRELUDE + code, *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(args)}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- preprocess

ASL_LABELS = [label for label in range(25) if label != 9]
ASL_ROWS = {"sign_mnist_train.csv": 27_455, "sign_mnist_test.csv": 7_172}
PREPROCESS_SECONDS, PREPROCESS_MB, REPEATS = 3.0, 1024.0, 3

PREPROCESS_CHILD = """
from dlilabs import preprocess
from dlilabs.ground.config import compose

raw_dir, out_dir, engine = sys.argv[1:4]
cfg = compose(["dataset=asl", f"paths.raw_dir={raw_dir}", f"paths.prepared_dir={out_dir}"])
baseline = peak_mb()
start = time.perf_counter()
summary = preprocess.run(cfg, engine=engine)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": peak_mb(), "baseline_mb": baseline,
                  "rows": summary["train_rows"] + summary["val_rows"]}))
"""


def write_kaggle_like_csv(
    path: Path, rows: int, rng: np.random.Generator, chunk: int = 4096
) -> None:
    """Write a CSV shaped like Kaggle's: header, label then 784 random pixels 0-255, CRLF.

    Built as bytes with numpy (per cell 3 digit slots + 2 separator slots, 0 = unused, then
    the zeros dropped): about twice as fast as pandas' to_csv with CRLF line endings."""
    digits = np.zeros((256, 3), dtype=np.uint8)
    for number in range(256):
        text = str(number).encode()
        digits[number, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    header = ",".join(["label", *(f"pixel{i}" for i in range(1, 785))]) + "\r\n"
    with open(path, "wb") as stream:
        stream.write(header.encode())
        for start in range(0, rows, chunk):
            count = min(chunk, rows - start)
            values = rng.integers(0, 256, size=(count, 785))
            values[:, 0] = rng.choice(ASL_LABELS, size=count)
            cells = np.zeros((count, 785, 5), dtype=np.uint8)
            cells[:, :, :3] = digits[values]
            cells[:, :-1, 3] = ord(",")
            cells[:, -1, 3:] = np.frombuffer(b"\r\n", dtype=np.uint8)
            flat = cells.reshape(-1)
            stream.write(flat[flat != 0].tobytes())


def _measure(raw_dir: Path, out_dir: Path, engine: str) -> dict:
    """Median time and largest peak RSS of REPEATS runs of the stage in fresh interpreters."""
    runs = [run_child(PREPROCESS_CHILD, str(raw_dir), str(out_dir), engine) for _ in range(REPEATS)]
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "peak_mb": max(run["peak_mb"] for run in runs),
        "baseline_mb": max(run["baseline_mb"] for run in runs),
        "rows": runs[0]["rows"],
    }


def bench_preprocess() -> list[Row]:
    """The ASL preprocess stage on full-size CSVs: the stage's engine, then the other one."""
    from dlilabs.core.rawdata import csv_engine

    engine = csv_engine()
    with tempfile.TemporaryDirectory(prefix="dlilabs-bench-") as folder:
        raw_dir = Path(folder) / "raw"
        raw_dir.mkdir()
        rng = np.random.default_rng(0)
        for name, rows in ASL_ROWS.items():
            write_kaggle_like_csv(raw_dir / name, rows, rng)
        stage = _measure(raw_dir, Path(folder) / "stage", engine)
        other = "pyarrow" if engine == "c" else "c"
        c_engine = _measure(raw_dir, Path(folder) / other, other)
    label = f"preprocess asl full-size ({stage['rows']:,} rows, median of {REPEATS})"
    return [
        Row(
            f"{label}, {engine} engine",
            [
                Measure("", stage["seconds"], "s", PREPROCESS_SECONDS),
                Measure(
                    "peak RSS",
                    stage["peak_mb"],
                    "MB",
                    PREPROCESS_MB,
                    f"{stage['baseline_mb']:.0f} MB after imports",
                ),
            ],
        ),
        Row(
            f"{label}, {other} engine (reference)",
            [
                Measure(
                    "",
                    c_engine["seconds"],
                    "s",
                    note=f"{other}/{engine} {c_engine['seconds'] / stage['seconds']:.2f}",
                ),
                Measure(
                    "peak RSS",
                    c_engine["peak_mb"],
                    "MB",
                    note=f"{other}/{engine} {c_engine['peak_mb'] / stage['peak_mb']:.2f}",
                ),
            ],
        ),
    ]


# ---------------------------------------------------------------- train

# Each comparison runs in one child, which builds a model per side (same architecture, same
# seed) and, round after round, fits each side in turn for FIT_EPOCHS epochs and times every
# epoch but the 1st, which absorbs tracing and Keras' per-fit set-up (numpy -> tensors, the
# validation iterator) that real 5-20 epoch runs pay once. An epoch's time is training plus
# validation; a side's figure is the median over its timed epochs of the time per training
# step (validation included), and the order of the sides rotates every round so load from
# other processes hits each side alike. The sides:
#   pipeline   what `python -m dlilabs.train` does: uint8 arrays into make_dataset, compiled
#              from conf/trainer (steps_per_execution), augmentation where trainer.augment_on
#              puts it on this device (the input pipeline on a CPU, the model on a GPU)
#   notebook   the course's own code: float64 `x / 255`, keras.utils.to_categorical,
#              model.fit(x, y, epochs, validation_data=(x_val, y_val)); the CNN labs reshape
#              to (n, 28, 28, 1); lab 4 feeds model.fit from the legacy ImageDataGenerator
#              with the course's settings (rotation 10, zoom 0.1, shifts 0.1, horizontal flip)
#   plain      the same on float32 arrays (a reference: what the float64 costs)
# Another busy process halves the speed of TensorFlow's 2 threads on 2 cores, so the child
# also measures, per epoch, the CPU other processes used (/proc/stat): epochs during which
# they used more than CLEAN_CORES are left out while each side keeps 2 clean ones, else all
# count and the row says the run was disturbed.
# Every side fits full epochs. A CNN epoch takes 25-40 s on 2 cores, so the CNN sides train on
# a quarter of ASL's rows (215 training + 56 validation batches of 32; ASL has 858 + 225), and
# the lab 3 row scales that to a full epoch. (Not `steps_per_epoch` on the full arrays: with
# arrays, Keras then spends seconds between epochs, and the notebooks never do that.)
NOTEBOOK_RATIO = 1.0  # pipeline / notebook, every lab
CNN_EPOCH_SECONDS = 25.0  # lab 3's full epoch, the worst timed one: <= 3x the ~8 s floor
MNIST_ROWS, ASL_SPLIT_ROWS = (60_000, 10_000), tuple(ASL_ROWS.values())
FIT_EPOCHS, CLEAN_CORES = 3, 0.25
CNN_ROWS = (215 * 32, 56 * 32)  # a quarter of ASL's rows, in whole batches

TRAIN_CHILD = """
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np

from dlilabs.ground.config import compose
from dlilabs.core.data import augment_in_model, build_augmenter, make_dataset, with_augmenter
from dlilabs.core.device import select_device
from dlilabs.core.fitting import make_optimizer
from dlilabs.core.models import build_model

spec = json.loads(sys.argv[1])
cfg = compose([f"model={spec['model']}", "augment=dli"])
trainer, classes = cfg.trainer, spec["classes"]
device = select_device(trainer.device, memory_growth=trainer.memory_growth)
keras.utils.set_random_seed(trainer.seed)
rng = np.random.default_rng(0)
x, x_val = (rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8) for rows in spec["rows"])
y, y_val = (rng.integers(0, classes, rows) for rows in spec["rows"])
# The course reshapes the CNN labs' images to (n, 28, 28, 1); build_cnn takes either shape.
shape = (28, 28, 1) if spec["model"] == "cnn" else (28, 28)


def pipeline_side(augment):
    # What dlilabs.train does, settings from conf/trainer.
    model = build_model(cfg.model, x.shape[1:], classes)
    model.compile(optimizer=make_optimizer(trainer.optimizer, trainer.learning_rate),
                  loss=trainer.loss, metrics=["accuracy"],
                  steps_per_execution=trainer.steps_per_execution)
    augmenter = build_augmenter(cfg.augment, trainer.seed) if augment else None
    in_model = augmenter is not None and augment_in_model(trainer.augment_on, device["device"])
    train = make_dataset(x, y, classes, trainer.batch_size, shuffle=True, seed=trainer.seed,
                         augmenter=None if in_model else augmenter,
                         shuffle_buffer=trainer.shuffle_buffer)
    val = make_dataset(x_val, y_val, classes, trainer.batch_size)
    fitted = with_augmenter(model, augmenter) if in_model else model
    return fitted, (train,), {"validation_data": val, "shuffle": False}


def notebook_side(dtype=np.float64, augment=False):
    # The course: no optimizer given (RMSprop 1e-3), `/ 255` (float64), to_categorical; its
    # model has no scaling layer (ours divides raw pixels by 255 itself: strip it).
    ours = build_model(cfg.model, shape, classes)
    model = keras.Sequential([keras.Input(shape), *ours.layers[1:]], name=ours.name)
    model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    images = (x / 255).astype(dtype, copy=False).reshape(-1, *shape)
    labels = keras.utils.to_categorical(y, classes)
    val = ((x_val / 255).astype(dtype, copy=False).reshape(-1, *shape),
           keras.utils.to_categorical(y_val, classes))
    if not augment:
        return model, (images, labels), {"validation_data": val}
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    datagen = ImageDataGenerator(rotation_range=10, zoom_range=0.1, width_shift_range=0.1,
                                 height_shift_range=0.1, horizontal_flip=True,
                                 vertical_flip=False)
    datagen.fit(images)
    return model, (datagen.flow(images, labels, batch_size=32),), {"validation_data": val}


def busy_seconds():
    # CPU seconds all processes spent since boot, idle and iowait excluded (Linux; without
    # /proc/stat it is NaN and other processes count as using 0 cores).
    try:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class EpochTimer(keras.callbacks.Callback):
    # [wall seconds, cores other processes used] of every epoch after the first.
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = (time.perf_counter(), busy_seconds(), sum(os.times()[:2]))

    def on_epoch_end(self, epoch, logs=None):
        wall, busy, own = (time.perf_counter(), busy_seconds(), sum(os.times()[:2]))
        seconds = wall - self.start[0]
        others = max(0.0, (busy - self.start[1]) - (own - self.start[2])) / seconds
        if epoch:
            self.epochs.append([seconds, others])


builders = {
    "pipeline": lambda: pipeline_side(False),
    "augmented": lambda: pipeline_side(True),
    "notebook": notebook_side,
    "notebook_augmented": lambda: notebook_side(augment=True),
    "plain": lambda: notebook_side(np.float32),
}
sides = {name: builders[name]() for name in spec["sides"]}
epochs = {name: [] for name in sides}
for round_ in range(spec["rounds"]):
    names = list(sides)[round_ % len(sides):] + list(sides)[:round_ % len(sides)]
    for name in names:
        model, args, kwargs = sides[name]
        timer = EpochTimer()
        model.fit(*args, **kwargs, epochs=spec["epochs"], callbacks=[timer], verbose=0)
        epochs[name] += timer.epochs
print(json.dumps({"epochs": epochs, "device": device}))
"""

SIDE_NAMES = {
    "pipeline": "pipeline",
    "augmented": "augmented pipeline",
    "notebook": "notebook",
    "notebook_augmented": "notebook ImageDataGenerator",
    "plain": "float32 model.fit",
}


@dataclass(frozen=True)
class Comparison:
    """One child's timed epochs: per side, ms per training step (validation included), the
    median and the worst of the clean epochs (see above)."""

    step_ms: dict[str, float]  # median
    worst_ms: dict[str, float]
    steps: int  # training steps per timed epoch
    counted: int  # epochs per side the medians are over
    disturbed: float  # the most cores other processes used in a counted epoch
    device: dict = field(default_factory=dict)

    @classmethod
    def from_epochs(
        cls, epochs: dict[str, list[list[float]]], steps: int, device: dict | None = None
    ) -> Comparison:
        """`epochs`: per side, [wall seconds, cores other processes used] per timed epoch."""
        kept = {name: [e for e in runs if e[1] <= CLEAN_CORES] for name, runs in epochs.items()}
        if min(map(len, kept.values())) < 2:
            kept = epochs
        per_step = {name: [1000 * e[0] / steps for e in runs] for name, runs in kept.items()}
        return cls(
            {name: statistics.median(times) for name, times in per_step.items()},
            {name: max(times) for name, times in per_step.items()},
            steps,
            min(map(len, kept.values())),
            max(others for runs in kept.values() for _, others in runs),
            device or {},
        )

    @classmethod
    def run(
        cls,
        model: str,
        rows: tuple[int, int],
        classes: int,
        sides: list[str],
        rounds: int,
    ) -> Comparison:
        spec = {
            "model": model,
            "rows": rows,
            "classes": classes,
            "sides": sides,
            "rounds": rounds,
            "epochs": FIT_EPOCHS,
        }
        result = run_child(TRAIN_CHILD, json.dumps(spec))
        return cls.from_epochs(result["epochs"], -(-rows[0] // 32), result["device"])

    def notes(self, note: str = "") -> str:
        notes = [note] if note else []
        notes.append(f"medians of >= {self.counted} later epochs per side, rotating order")
        notes.append(f"other processes used <= {self.disturbed:.2f} cores")
        if self.disturbed > CLEAN_CORES:
            notes.append("DISTURBED: re-run on an idle machine")
        return "; ".join(notes)

    def row(self, label: str, top: str, bottom: str, target: float | None, note: str = "") -> Row:
        """`top` over `bottom`: `a ms/step vs b ms/step -> ratio a/b (target <= t; ...)`."""
        a, b = self.step_ms[top], self.step_ms[bottom]
        return Row(
            label,
            [
                Measure(SIDE_NAMES[top], a, "ms/step", digits=1),
                Measure(f"vs {SIDE_NAMES[bottom]}", b, "ms/step", digits=1),
                Measure("-> ratio", a / b, "", target, self.notes(note), digits=2),
            ],
            separator=" ",
        )


def device_row(device: dict) -> Row:
    """What the comparisons ran on: the GPU's name, else the CPU's model and cores."""
    import os

    if device.get("device") == "gpu":
        text = f"GPU {device['device_name']} ({device['precision']})"
    else:
        model = "CPU"
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                             if line.startswith("model name"))  # fmt: skip
        except (OSError, StopIteration):
            pass
        text = f"CPU {model}, {len(os.sched_getaffinity(0))} cores"
    return Row(f"train device: {text}")


def bench_train() -> list[Row]:
    """Time per training step of the pipeline over the course notebooks' own code, on random
    data of the real shapes, per lab; lab 3's full epoch against its goal."""
    lab1 = Comparison.run("mlp", MNIST_ROWS, 10, ["pipeline", "notebook", "plain"], rounds=2)
    lab2 = Comparison.run("mlp", ASL_SPLIT_ROWS, 24, ["pipeline", "notebook", "plain"], rounds=3)
    cnn_sides = ["pipeline", "notebook", "augmented", "notebook_augmented"]
    cnn = Comparison.run("cnn", CNN_ROWS, 24, cnn_sides, rounds=3)
    quarter = f" ({CNN_ROWS[0] // 32} train + {CNN_ROWS[1] // 32} val steps: a quarter epoch)"
    full = -(-ASL_SPLIT_ROWS[0] // 32) / 1000  # ms/step -> s per full ASL epoch
    unaugmented = cnn.step_ms["augmented"] / cnn.step_ms["pipeline"]
    return [
        device_row(cnn.device),
        lab1.row("train lab1 mlp mnist-shape", "pipeline", "notebook", NOTEBOOK_RATIO),
        lab1.row("train lab1 (reference)", "pipeline", "plain", None),
        lab2.row("train lab2 mlp asl-shape", "pipeline", "notebook", NOTEBOOK_RATIO),
        lab2.row("train lab2 (reference)", "pipeline", "plain", None),
        cnn.row("train lab3 cnn asl-shape" + quarter, "pipeline", "notebook", NOTEBOOK_RATIO),
        cnn.row(
            "train lab4 augmented cnn asl-shape" + quarter,
            "augmented",
            "notebook_augmented",
            NOTEBOOK_RATIO,
            f"augmented/unaugmented pipeline {unaugmented:.2f}",
        ),
        Row(
            "train lab3 cnn full asl epoch (858 + 225 steps, from the quarter epochs)",
            [
                Measure("median", cnn.step_ms["pipeline"] * full, "s", digits=1),
                Measure(
                    "worst",
                    cnn.worst_ms["pipeline"] * full,
                    "s",
                    CNN_EPOCH_SECONDS,
                    f"notebook median {cnn.step_ms['notebook'] * full:.1f} s; {cnn.notes()}",
                    digits=1,
                ),
            ],
        ),
    ]


# ---------------------------------------------------------------- search


def bench_search() -> list[Row]:
    """An Optuna search of the CNN with pruning vs without (scripts/bench_search.py)."""
    from bench_search import rows

    return rows()


# ---------------------------------------------------------------- overhead


def bench_overhead() -> list[Row]:
    """Stages' fixed costs beside plain Keras, and sweeps' per-child cost
    (scripts/bench_overhead.py)."""
    from bench_overhead import rows

    return rows()


def bench_demo() -> list[Row]:
    """`make demo` end to end (scripts/bench_overhead.py)."""
    from bench_overhead import demo_rows

    return demo_rows()


# ---------------------------------------------------------------- runner


def bench_repro() -> list[Row]:
    """A whole `dvc repro` on random data of the real sizes (scripts/bench_repro.py)."""
    from bench_repro import rows

    return rows()


SECTIONS: dict[str, Callable[[], list[Row]]] = {
    "preprocess": bench_preprocess,
    "train": bench_train,
    "search": bench_search,
    "overhead": bench_overhead,
    "demo": bench_demo,
    "repro": bench_repro,
}
# Run only when named: it trains every lab for its full epochs, twice (~35 min on 2 CPU cores).
ON_REQUEST = {"repro"}


def main(argv: list[str]) -> int:
    names = argv or [name for name in SECTIONS if name not in ON_REQUEST]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        print(
            f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    missed = []
    for name in names:
        print(f"== {name}", flush=True)
        for row in SECTIONS[name]():
            print(row, flush=True)
            if not row.met:
                missed.append(row.label)
    if missed:
        print(f"{len(missed)} target(s) missed: {'; '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
