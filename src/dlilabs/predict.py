"""`python -m dlilabs.predict MODEL INPUT...`: classify images with a trained lab model.

    python -m dlilabs.predict asl_cnn_aug hand.jpg b.png          # lab name: latest version
    python -m dlilabs.predict models:/asl_cnn_aug@champion hand.jpg   # registry alias
    python -m dlilabs.predict models/asl_cnn/model.keras sign_mnist_test.csv --top-k 5

MODEL is a registered model name (its latest version), a lab whose `models/<lab>/model.keras`
exists in the project, an MLflow URI (`models:/<name>@<alias>`, `models:/<name>/<version>`,
`runs:/<id>/model`) or a path (a .keras file, an MLflow model folder). INPUTs are images
(PNG, JPEG, ... of any size: loaded as the course's next lab does, grayscale and resized to
28x28) or CSV files in the Kaggle layout (`label` optional, then pixel1..pixel784), one
prediction per row; the model scales the raw pixels (older versions, which take scaled
input, get them divided by 255 here). Prints the top classes with their probabilities,
as letters for ASL models; for CSV rows with a label, the actual class too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from dlilabs.ground.config import project_root
from dlilabs.ground.errors import UserError

FORMATS = "an image (PNG, JPEG, ...) or a Kaggle-layout CSV (label,pixel1..pixel784)"


def load_image(path: Path) -> np.ndarray:
    """An image file of any size and mode -> float32 (28, 28) pixels 0-255 (see
    dlilabs.core.pixels.decode_image: the served models decode base64 images with it too)."""
    from dlilabs.core.pixels import decode_image

    return decode_image(path, str(path), FORMATS)


def load_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A Kaggle-layout CSV -> float32 images (n, 28, 28) pixels 0-255 and the raw `label`
    column (n,) if there is one. Bad cells are UserErrors naming the row and column."""
    from dlilabs.core.rawdata import frame_values, kaggle_columns, pixel_names, read_csv, to_images

    frame = read_csv(path, header=True)
    kaggle_columns(frame.columns, path.name, label_required=False)  # the preprocess schema
    columns = pixel_names()
    if frame.empty:
        raise UserError(f"{path}: no data rows")
    images = to_images(frame_values(frame[columns], path.name), path.name, columns)
    labels = frame_values(frame[["label"]], path.name)[:, 0] if "label" in frame else None
    return images.astype(np.float32), labels


def read_inputs(paths: list[Path]) -> tuple[list[str], np.ndarray, list[object]]:
    """Files -> (one name per image, float32 pixels (n, 28, 28) 0-255, raw labels or None
    each)."""
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such file; give {FORMATS}")
    names, batches, labels = [], [], []
    for path in paths:
        if path.suffix.lower() in (".csv", ".gz"):
            images, raw = load_csv(path)
            names += [f"{path.name} row {row}" for row in range(1, len(images) + 1)]
            labels += list(raw) if raw is not None else [None] * len(images)
        else:
            images = load_image(path)[np.newaxis]
            names.append(path.name)
            labels.append(None)
        batches.append(images)
    return names, np.concatenate(batches).astype(np.float32), labels


def tracking_uri(uri: str | None) -> str:
    """The store to look models up in: `uri`, else the one the stages use (conf/tracking)."""
    if uri:
        return uri
    from dlilabs.ground.config import compose

    return compose().tracking.uri


def load_keras_file(path: Path, lab: str | None = None):
    """A .keras file -> the Keras model (`dlilabs.core.models.load_keras_file`: a damaged
    file or an unknown layer is one UserError); `lab` names the train stage that wrote it."""
    from dlilabs.core.models import load_keras_file as load

    return load(path, f"train@{lab}" if lab else None)


def load_model(spec: str, root: Path, uri: str):
    """MODEL (see the module doc) -> (Keras model, dataset name or None, description)."""
    from dlilabs.tracking import registry

    if spec.startswith(("models:/", "runs:/")):
        return registry.load_keras_model(spec, uri) + (spec,)
    path = Path(spec)
    if path.is_dir() and (path / "MLmodel").is_file():
        return registry.load_model_folder(path), None, str(path)
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"
    if path.is_file():
        return load_keras_file(path), None, str(path)
    known = registry.store_exists(uri) and "/" not in spec
    version = registry.latest_version(spec, uri) if known else None
    if version is not None:
        model_uri = f"models:/{spec}/{version}"
        return registry.load_keras_model(model_uri, uri) + (model_uri,)
    local = root / "models" / spec / "model.keras"
    if local.is_file():
        return load_keras_file(local, spec), None, str(local)
    raise UserError(
        f"no model {spec!r}: not a file, not a registered model in {uri} and no "
        f"{local.relative_to(root)} in {root}. Train it first (`dvc repro "
        f"train@{spec}`), or give a path or models:/<name>@<alias>"
    )


def dataset_classes(
    num_classes: int, dataset: str | None, root: Path
) -> tuple[list[str], list[int]]:
    """(class names, raw labels) from conf/dataset/<dataset>.yaml, else from the first
    dataset there with `num_classes` classes (10: digits, 24: ASL letters), else 0..n-1."""
    folder = root / "conf" / "dataset"
    files = [folder / f"{dataset}.yaml"] if dataset else sorted(folder.glob("*.yaml"))
    for file in files:
        conf = yaml.safe_load(file.read_text()) if file.is_file() else None
        if conf and len(conf.get("class_names") or []) == num_classes:
            return [str(n) for n in conf["class_names"]], list(conf["raw_labels"])
    return [str(i) for i in range(num_classes)], list(range(num_classes))


def top_classes(
    probabilities: np.ndarray, class_names: list[str], k: int
) -> list[list[tuple[str, float]]]:
    """Probabilities (n, classes) -> for each image the k most likely (class name, p)."""
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [
        [(class_names[c], float(row[c])) for c in best]
        for row, best in zip(probabilities, order, strict=True)
    ]


def classify(model, images: np.ndarray) -> np.ndarray:
    """float32 pixels (n, 28, 28) 0-255 -> probabilities (n, classes): the computation the
    served model runs (dlilabs.core.pixels.score; older models get the pixels / 255)."""
    from dlilabs.core.pixels import score

    return score(model, images)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (else argparse's one-line usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1: show at least one class")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, classify every input, print one line each."""
    parser = argparse.ArgumentParser(
        prog="python -m dlilabs.predict", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "model",
        help="lab or registered model name, models:/<name>@<alias>, "
        "models:/<name>/<version>, or a path to model.keras",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or Kaggle-layout CSVs")
    parser.add_argument("--top-k", type=positive_int, default=3, help="classes to show (default 3)")
    parser.add_argument(
        "--dataset",
        help="conf/dataset name for the class names (default: "
        "the model's run, else by the number of classes)",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    args = parser.parse_args(argv)
    try:
        root = project_root()
        names, images, labels = read_inputs(args.inputs)
        uri = tracking_uri(args.tracking_uri)
        model, dataset, description = load_model(args.model, root, uri)
        probabilities = classify(model, images)
        class_names, raw_labels = dataset_classes(
            probabilities.shape[1], args.dataset or dataset, root
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    card = ""
    if description.startswith(("models:/", "runs:/")):  # its model card's one line, if any
        from dlilabs.tracking.cards import card_summary

        summary = card_summary(description, uri)
        card = f"; card: {summary}" if summary else ""
    print(f"model: {description} ({len(class_names)} classes){card}")
    actual_names = dict(zip(raw_labels, class_names, strict=True))
    for name, best, label in zip(
        names, top_classes(probabilities, class_names, args.top_k), labels, strict=True
    ):
        shown = ", ".join(f"{cls} {p:.3f}" for cls, p in best)
        actual = "" if label is None else f"  (actual: {actual_names.get(int(label), label)})"
        print(f"{name}: {shown}{actual}")
    return 0


if __name__ == "__main__":
    from dlilabs.ground.startup import quiet_tensorflow_startup, run_command

    quiet_tensorflow_startup()  # the command's process only, not on import (tests call main)
    run_command(main)
