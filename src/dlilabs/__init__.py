"""dlilabs: NVIDIA DLI's deep-learning fundamentals labs as a DVC + Hydra + MLflow pipeline.

Importing the package also quiets TensorFlow's start-up, which otherwise prints half a dozen
lines per stage on a CPU machine (see `_QuietTensorFlowImport`).
"""

import contextlib
import importlib.abc
import os
import re
import sys
import tempfile

# TensorFlow's C++ log level: errors only (info and warnings dropped). Must be set before
# TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# TensorFlow's native libraries log through absl before anything has configured it, so
# TF_CPP_MIN_LOG_LEVEL does not reach these, printed straight to file descriptor 2:
#   WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
#   I0000 00:00:1796064301.829879 11252 port.cc:153] oneDNN custom operations are on. ...
#   I0000 00:00:1796064301.830190 11252 cudart_stub.cc:31] Could not find cuda drivers ...
# (twice: two libraries, two copies of absl), and at the first device query, with no driver:
#   E0000 00:00:1796064309.486412 11252 cuda_platform.cc:52] failed call to cuInit: ... (303)
# No environment variable silences them (measured: TF_CPP_MIN_LOG_LEVEL=3, GLOG_minloglevel,
# ABSL_MIN_LOG_LEVEL, CUDA_VISIBLE_DEVICES="" or -1), so the import and that first query run
# with fd 2 sent to a file, and its lines are written back except the ones listed above.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called"
_NO_DRIVER = "Could not find cuda drivers"


def _worth_showing(text: str) -> str:
    """Captured stderr -> the lines a user should still see: everything but absl lines below
    TF_CPP_MIN_LOG_LEVEL (0-3: I, W, E, F), absl's pre-init notice, and the cuInit error when
    TensorFlow itself found no CUDA driver (a GPU machine's cuInit error is kept)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    level = int(level) if level.isdigit() else 0
    no_driver = _NO_DRIVER in text
    kept = []
    for line in text.splitlines(keepends=True):
        absl = _ABSL_LINE.match(line)
        if (
            (line.startswith(_ABSL_PREINIT) and level >= 1)
            or (absl and "IWEF".index(absl.group(1)) < level)
            or (absl and no_driver and "failed call to cuInit" in line)
        ):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _native_stderr_filtered():
    """Send file descriptor 2 to a temporary file; on exit write back `_worth_showing` of it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr at all: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            if kept := _worth_showing(capture.read().decode(errors="replace")):
                os.write(2, kept.encode())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Loads `tensorflow` through its own loader, with native stderr filtered during the
    import and TensorFlow's first device query (which only lists devices: memory growth,
    visible devices and thread counts can still be set afterwards). Removes itself after."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    self.loader, spec.loader = spec.loader, self
                    return spec
        return None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of ours
        with _native_stderr_filtered():
            self.loader.exec_module(module)
            module.config.list_physical_devices()


if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())
