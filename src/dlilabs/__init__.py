"""dlilabs: NVIDIA DLI's deep-learning fundamentals labs as a DVC + Hydra + MLflow pipeline.

Importing the package changes nothing in the process: the commands' mains quiet TensorFlow's
start-up themselves (`dlilabs.ground.startup.quiet_tensorflow_startup`).
"""

__version__ = "0.1.0"
