"""Quiet TensorFlow's start-up for a command's main, and only there (`quiet_tensorflow_startup`);
import Keras there without the scikit-learn wrappers nothing uses (`KerasWithoutScikitLearn`).

TensorFlow's native libraries log through absl before anything has configured it, so
TF_CPP_MIN_LOG_LEVEL does not reach these, printed straight to file descriptor 2:
  WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
  I0000 00:00:1796064301.829879 11252 port.cc:153] oneDNN custom operations are on. ...
  I0000 00:00:1796064301.830190 11252 cudart_stub.cc:31] Could not find cuda drivers ...
(twice: two libraries, two copies of absl), and at the first device query, with no driver:
  E0000 00:00:1796064309.486412 11252 cuda_platform.cc:52] failed call to cuInit: ... (303)
No environment variable silences them (measured: TF_CPP_MIN_LOG_LEVEL=3, GLOG_minloglevel,
ABSL_MIN_LOG_LEVEL, CUDA_VISIBLE_DEVICES="" or -1), so the import and that first query run
with fd 2 sent through a pipe to a small filter process, which forwards every line but those
as it arrives. A separate process, not a thread or a file replayed afterwards: if TensorFlow
aborts in that window (a fatal absl line, then abort()), this process dies at once, and the
filter still reads the pipe to its end and forwards the fatal line.

Importing this module changes nothing; stdlib only (the filter runs this file as a script,
`python -I -S startup.py LEVEL`, without site-packages).
"""

from __future__ import annotations

# Only what the filter process needs is imported at the top: it runs this file at each start.
import contextlib
import os
import re
import sys
from collections.abc import Callable  # loaded already by re's imports

# TensorFlow's C++ log level the commands default to: errors only (info and warnings dropped).
LOG_LEVEL = "2"
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called"
_NO_DRIVER = "Could not find cuda drivers"
# How long the end of the window waits for the filter to forward the last lines.
_DRAIN_SECONDS = 10.0


def log_level(value: str | None) -> int:
    """TF_CPP_MIN_LOG_LEVEL's value (0-3, else 0: TensorFlow's own default)."""
    return int(value) if value and value.isdigit() else 0


class NoiseFilter:
    """Decides line by line what a user should still see: everything but absl lines below
    `level` (0-3: I, W, E, F), absl's pre-init notice (level >= 1), and the cuInit error once
    TensorFlow itself said it found no CUDA driver (a GPU machine's cuInit error is kept)."""

    def __init__(self, level: int):
        self.level = level
        self.no_driver = False

    def keep(self, line: str) -> bool:
        """Whether to show `line` (seen in order: the driver notice comes before cuInit's)."""
        self.no_driver = self.no_driver or _NO_DRIVER in line
        absl = _ABSL_LINE.match(line)
        return not (
            (line.startswith(_ABSL_PREINIT) and self.level >= 1)
            or (absl and "IWEF".index(absl.group(1)) < self.level)
            or (absl and self.no_driver and "failed call to cuInit" in line)
        )


def worth_showing(text: str, level: int) -> str:
    """Captured stderr -> the lines `NoiseFilter(level)` keeps."""
    noise = NoiseFilter(level)
    return "".join(line for line in text.splitlines(keepends=True) if noise.keep(line))


def write_all(sink: int, data: bytes) -> None:
    """Write all of `data` to file descriptor `sink` (os.write may take part of it)."""
    while data:
        data = data[os.write(sink, data) :]


def forward(source: int, sink: int, level: int) -> None:
    """Copy `source` to `sink` until end of file, line by line as each line completes,
    dropping the noise; a last line without a newline is forwarded too."""
    noise, pending = NoiseFilter(level), b""
    while chunk := os.read(source, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        kept = [line + b"\n" for line in lines if noise.keep(line.decode(errors="replace"))]
        write_all(sink, b"".join(kept))
    if pending and noise.keep(pending.decode(errors="replace")):
        write_all(sink, pending)


@contextlib.contextmanager
def native_stderr_filtered():
    """For the block, send file descriptor 2 through the filter process (see the module doc);
    after it, wait for the filter to forward the last lines, so output keeps its order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr at all: nothing to filter
        yield
        return
    import subprocess

    reader, writer = os.pipe()
    try:
        level = str(log_level(os.environ.get("TF_CPP_MIN_LOG_LEVEL")))
        # Its own session: a Ctrl-C meant for the command does not stop the filter first.
        script = [sys.executable, "-I", "-S", os.path.abspath(__file__), level]
        filter_process = subprocess.Popen(
            script, stdin=reader, stdout=saved, stderr=saved, start_new_session=True
        )
    except OSError:  # cannot start a process: leave stderr as it is
        for descriptor in (reader, writer, saved):
            os.close(descriptor)
        yield
        return
    os.close(reader)
    os.dup2(writer, 2)
    os.close(writer)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the filter reads to its end
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child holds the pipe: go on
            filter_process.wait(_DRAIN_SECONDS)


class QuietTensorFlowImport:
    """A meta path finder and loader (the protocols of importlib.abc's MetaPathFinder and
    Loader) that loads `tensorflow` through its own loader, with native stderr filtered during the
    import and TensorFlow's first device query (which only lists devices: memory growth,
    visible devices and thread counts can still be set afterwards). Removes itself after."""

    def find_spec(self, name, path=None, target=None):
        return _take_over(self, name, path, target) if name == "tensorflow" else None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of ours
        with native_stderr_filtered():
            self.loader.exec_module(module)
            module.config.list_physical_devices()


def _take_over(finder, name, path, target):
    """The spec the other finders give for `name`, with `finder` as its loader (the real
    loader kept as `finder.loader`); None if none finds it."""
    for other in sys.meta_path:
        if other is not finder and hasattr(other, "find_spec"):
            spec = other.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                finder.loader, spec.loader = spec.loader, finder
                return spec
    return None


class KerasWithoutScikitLearn:
    """A meta path finder and loader for `keras`: while keras imports, `import sklearn` fails,
    so Keras leaves out its optional scikit-learn wrappers (keras.wrappers.SKLearnClassifier
    and kin), which nothing here uses. Importing scikit-learn and SciPy for them was 0.6 s of
    a 4.7 s `import keras` (python -X importtime). Removes itself once keras is imported;
    `import sklearn` works as usual after that."""

    def __init__(self):
        self.importing = False

    def find_spec(self, name, path=None, target=None):
        if self.importing and name.partition(".")[0] == "sklearn":
            raise ModuleNotFoundError(f"No module named {name!r} (while keras imports)", name=name)
        return _take_over(self, name, path, target) if name == "keras" else None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of ours
        self.importing = True
        try:
            self.loader.exec_module(module)
        finally:
            self.importing = False
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)


def quiet_tensorflow_startup() -> None:
    """For a command's main, before TensorFlow loads: TF_CPP_MIN_LOG_LEVEL defaults to
    LOG_LEVEL (TensorFlow reads it when it loads; child processes inherit it), and the first
    `import tensorflow` runs filtered, and the first `import keras` without scikit-learn
    (`KerasWithoutScikitLearn`). Calling it again, or after they loaded, is a no-op but for
    the variable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", LOG_LEVEL)
    for name, finder_class in (
        ("tensorflow", QuietTensorFlowImport),
        ("keras", KerasWithoutScikitLearn),
    ):
        installed = any(isinstance(finder, finder_class) for finder in sys.meta_path)
        if name not in sys.modules and not installed:
            sys.meta_path.insert(0, finder_class())


def exit_status(code: object) -> int:
    """The process status `sys.exit(code)` gives: None 0, an int itself, anything else 1 (after
    printing it to stderr, as Python does)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def run_command(main: Callable[[], object]) -> None:
    """A command's `__main__`; never returns. Run `main()` (its return value or SystemExit is
    the exit status, as with `sys.exit(main())`), then end the process as Python's own exit
    would (other threads joined, atexit handlers run: logging, MLflow and the store's
    connections close there; streams flushed), but without tearing the interpreter down
    module by module. That last step freed TensorFlow's, Keras' and MLflow's objects one by
    one: 1.4 s after a plain Keras script, 2.2 s after a train stage (from the last atexit
    handler to the process's end), which every DVC stage made its user wait for nothing.
    An error that is not a SystemExit goes through Python's usual exit (traceback, status 1)."""
    try:
        status = exit_status(main())
    except SystemExit as stop:
        status = exit_status(stop.code)
    import atexit
    import threading

    with contextlib.suppress(Exception):  # what Python's exit does first: join other threads
        threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(status)


if __name__ == "__main__":  # the filter process: the pipe on stdin, the real stderr on stdout
    with contextlib.suppress(OSError, KeyboardInterrupt):  # the real stderr went away
        forward(0, 1, log_level(sys.argv[1] if len(sys.argv) > 1 else None))
