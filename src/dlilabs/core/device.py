"""The train stage's device request: use a GPU when there is one, say what was used."""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs.core.device")


def select_device(
    device: str = "gpu",
    require_gpu: bool = False,
    memory_growth: bool = True,
    mixed_precision: bool = False,
    gpus: list | None = None,
) -> dict[str, str]:
    """Configure TensorFlow for the requested device; call before any tensor is created.

    `gpus` defaults to the GPUs TensorFlow sees (tests pass stand-ins). Returns what was used:
    {"device": "gpu" | "cpu", "device_name": ..., "gpu_count": "N", "precision": ...}.
    Raises UserError when `require_gpu` and there is none."""
    if device not in ("gpu", "cpu"):
        raise UserError(f"trainer.device={device!r} is not valid: use gpu or cpu")
    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    if device == "cpu":
        if require_gpu:
            raise UserError("trainer.device=cpu contradicts trainer.require_gpu=true: drop one")
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        log.info("Device: CPU (trainer.device=cpu)")
        return {"device": "cpu", "device_name": "cpu", "gpu_count": "0", "precision": "float32"}
    if not gpus:
        if require_gpu:
            raise UserError(
                "trainer.require_gpu=true but TensorFlow sees no GPU. Check `nvidia-smi` and "
                "that the CUDA build is installed (pip install -e '.[gpu]'), or run on the CPU "
                "with `trainer.require_gpu=false` (or `trainer.device=cpu`)."
            )
        # The usual case on a laptop, so information, not a warning; require_gpu makes it one.
        log.info("Device: CPU (no GPU visible; trainer.require_gpu=true would stop here)")
        return {"device": "cpu", "device_name": "cpu", "gpu_count": "0", "precision": "float32"}
    if memory_growth:
        for gpu in gpus:
            # Grow on demand instead of grabbing all memory, so parallel jobs can share a GPU.
            tf.config.experimental.set_memory_growth(gpu, True)
    precision = "float32"
    if mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
        precision = "mixed_float16"
    details = tf.config.experimental.get_device_details(gpus[0]) or {}
    name = details.get("device_name", gpus[0].name)
    log.info("Device: GPU %s (%d visible, %s)", name, len(gpus), precision)
    return {
        "device": "gpu",
        "device_name": name,
        "gpu_count": str(len(gpus)),
        "precision": precision,
    }


def launcher_cores(cores: int | None = None) -> int | None:
    """Cores this job may use when a parallel Hydra launcher runs it: cores / joblib's n_jobs,
    or submitit's cpus_per_task; None for a single run or the sequential launcher."""
    from hydra.core.hydra_config import HydraConfig

    try:
        launcher = HydraConfig.get().launcher
    except ValueError:  # not inside a Hydra app
        return None
    cores = cores or len(os.sched_getaffinity(0))
    if launcher.get("n_jobs") is not None:
        jobs = launcher.n_jobs if launcher.n_jobs > 0 else cores
        return max(1, cores // jobs)
    return launcher.get("cpus_per_task")


def configure_threads(threads: int | str | None) -> int | None:
    """Cap TensorFlow's thread pools: `threads` = a number, "auto" (the launcher's share of the
    cores, else TensorFlow's default) or None (default). Returns the cap applied, if any."""
    count = launcher_cores() if threads == "auto" else threads
    if not count:
        return None
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(count))
        tf.config.threading.set_inter_op_parallelism_threads(int(count))
    except RuntimeError:
        # A reused worker process (joblib) already set them for an earlier job: same share.
        pass
    log.info("TensorFlow threads: %s per job", count)
    return int(count)
