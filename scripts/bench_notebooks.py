"""The course notebooks' own code for the four image labs, timed end to end: the `repro`
bench's other side (`scripts/bench_repro.py`), on the same downloaded files.

Each lab runs in a fresh interpreter (`NOTEBOOK`), as a notebook's kernel does: import Keras,
read the data (lab 1 `mnist.npz` as `keras.datasets.mnist.load_data` reads it; labs 2-4 the
Kaggle CSVs with pandas, labels remapped to 24 classes), `/ 255`, reshape, `to_categorical`,
build the course's model, compile with Keras' defaults (RMSprop, no optimizer given), fit for
the lab's epochs with validation data (lab 4 from the legacy `ImageDataGenerator` with the
course's settings) and, for lab 4, save the model as the course does. What is timed: the
whole process (what a user waits for) and its epochs (first to last batch of each, validation
included, as the pipeline's `time/epoch_seconds`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The labs as `dvc repro` trains them (conf/experiment/<lab>.yaml): model kind, epochs.
LABS = {"mnist_mlp": ("mlp", 5), "asl_mlp": ("mlp", 20), "asl_cnn": ("cnn", 20),
        "asl_cnn_aug": ("cnn_aug", 20)}  # fmt: skip

NOTEBOOK = """
import json, sys, time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from keras.layers import (BatchNormalization, Conv2D, Dense, Dropout, Flatten, Input,
                          MaxPool2D)

lab, kind, epochs, folder, out = sys.argv[1:]
epochs, folder = int(epochs), Path(folder)
if lab == "mnist_mlp":
    with np.load(folder / "mnist.npz") as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_valid, y_valid = data["x_test"], data["y_test"]
    num_classes = 10
else:
    train_df = pd.read_csv(folder / "sign_mnist_train.csv")
    valid_df = pd.read_csv(folder / "sign_mnist_test.csv")
    y_train, y_valid = train_df.pop("label").values, valid_df.pop("label").values
    y_train, y_valid = y_train - (y_train > 9), y_valid - (y_valid > 9)
    x_train, x_valid = train_df.values, valid_df.values
    num_classes = 24
shape = (784,) if kind == "mlp" else (28, 28, 1)
x_train = (x_train / 255).reshape(-1, *shape)
x_valid = (x_valid / 255).reshape(-1, *shape)
y_train = keras.utils.to_categorical(y_train, num_classes)
y_valid = keras.utils.to_categorical(y_valid, num_classes)

if kind == "mlp":
    model = keras.Sequential([
        Input(shape), Dense(units=512, activation="relu"), Dense(units=512, activation="relu"),
        Dense(units=num_classes, activation="softmax"),
    ])
else:
    model = keras.Sequential([
        Input(shape),
        Conv2D(75, (3, 3), strides=1, padding="same", activation="relu"),
        BatchNormalization(), MaxPool2D((2, 2), strides=2, padding="same"),
        Conv2D(50, (3, 3), strides=1, padding="same", activation="relu"), Dropout(0.2),
        BatchNormalization(), MaxPool2D((2, 2), strides=2, padding="same"),
        Conv2D(25, (3, 3), strides=1, padding="same", activation="relu"),
        BatchNormalization(), MaxPool2D((2, 2), strides=2, padding="same"),
        Flatten(), Dense(units=512, activation="relu"), Dropout(0.3),
        Dense(units=num_classes, activation="softmax"),
    ])
model.compile(loss="categorical_crossentropy", metrics=["accuracy"])


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


timer = EpochTimer()
if kind == "cnn_aug":
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    datagen = ImageDataGenerator(rotation_range=10, zoom_range=0.1, width_shift_range=0.1,
                                 height_shift_range=0.1, horizontal_flip=True, vertical_flip=False)
    datagen.fit(x_train)
    model.fit(datagen.flow(x_train, y_train, batch_size=32), epochs=epochs,
              steps_per_epoch=-(-len(x_train) // 32), validation_data=(x_valid, y_valid),
              callbacks=[timer], verbose=2)
    model.save(Path(out).with_suffix(".keras"))
else:
    model.fit(x_train, y_train, epochs=epochs, validation_data=(x_valid, y_valid),
              callbacks=[timer], verbose=2)
Path(out).write_text(json.dumps(timer.seconds))
"""


def timed_notebooks(downloads: Path, scratch: Path, labs=LABS) -> dict[str, tuple[float, float]]:
    """Run each lab's notebook code on the files in `downloads`, one after the other; lab ->
    (the process's wall seconds, its epochs' summed seconds). Output goes to
    `scratch`/notebook-<lab>.log."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    found = {}
    for lab, (kind, epochs) in labs.items():
        seconds_file = scratch / f"notebook-{lab}.json"
        log = scratch / f"notebook-{lab}.log"
        command = [sys.executable, "-c", NOTEBOOK, lab, kind, str(epochs), str(downloads),
                   str(seconds_file)]  # fmt: skip
        start = time.perf_counter()
        with log.open("w") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the notebook code of {lab} failed ({done.returncode}); see {log}")
        found[lab] = (wall, sum(json.loads(seconds_file.read_text())))
        print(f"  notebook {lab}: {wall:.0f} s, epochs {found[lab][1]:.0f} s", flush=True)
    return found
