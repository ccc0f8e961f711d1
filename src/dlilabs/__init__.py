"""dlilabs: NVIDIA DLI's deep-learning fundamentals labs as a DVC + Hydra + MLflow pipeline."""

import os

# TensorFlow prints a screen of C++ start-up notices on every import; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
