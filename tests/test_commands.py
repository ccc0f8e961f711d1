"""Every command the README's shell blocks and the comments of params.yaml and dvc.yaml show
is one that works as written, checked without running the work:

- `python -m dlilabs.<stage> ...` (the Hydra stages): the overrides compose (Hydra's compose
  API in-process, as `--cfg job` would; each value of a sweep `a,b` or `choice(a,b)`);
- `python -m dlilabs.<tool> ...` (argparse tools): the tool exists and its --help lists the
  subcommand and every option used;
- `dvc ...`: DVC's own command-line parser accepts it, and `dvc exp run -S` values go through
  DVC's own override grammar onto a copy of params.yaml; a lab's `overrides` then compose;
- `mlflow ...`: MLflow's click command parses it; `make <target>`: the Makefile has it.

In comments, a command is a backtick-quoted span starting with one of those words.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

HYDRA_STAGES = {"download", "preprocess", "train", "evaluate"}
COMMAND_WORDS = ("python", "dvc", "make", "mlflow")


def shell_blocks(markdown: str) -> list[str]:
    """The fenced blocks marked bash/sh/shell (output blocks are unmarked)."""
    return re.findall(r"^ *```(?:bash|sh|shell)\n(.*?)^ *```", markdown, re.S | re.M)


def commands_in_block(block: str) -> list[str]:
    """Each command of a shell block: continuation lines and multi-line quotes joined, `&&`
    chains split, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found, pending = [], ""
    for line in joined.splitlines():
        pending += line + "\n"
        try:
            parts = [shlex.split(part, comments=True) for part in pending.split("&&")]
        except ValueError:  # a quote that spans lines: read on
            continue
        found += [shlex.join(words) for words in parts if words]
        pending = ""
    return found


def commands_in_comments(text: str) -> list[str]:
    """In `#` comments: backtick spans that start with a command word, and, outside them, the
    rest of a comment from `dvc exp run` or `python -m dlilabs.` on."""
    found = []
    for line in text.splitlines():
        if "#" not in line:
            continue
        comment = line.split("#", 1)[1]
        spans = re.findall(r"`([^`]+)`", comment)
        found += [span for span in spans if span.split()[0] in COMMAND_WORDS]
        bare = re.sub(r"`[^`]*`", " ", comment)
        found += re.findall(r"((?:dvc exp run|python -m dlilabs\.)[^#]*?)\s*$", bare)
    return found


def all_commands() -> list[tuple[str, str]]:
    """(where, command) for every command shown, project commands only."""
    found = []
    for block in shell_blocks((REPO / "README.md").read_text()):
        found += [("README.md", command) for command in commands_in_block(block)]
    for name in ("params.yaml", "dvc.yaml"):
        found += [(name, command) for command in commands_in_comments((REPO / name).read_text())]
    return [(where, command) for where, command in found if project_command(command)]


def project_command(command: str) -> list[str] | None:
    """The command's words from the program on (env assignments and .venv/bin/ dropped), when
    it is a project command; else None (git, pip, export, ...)."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    if not words:
        return None
    words[0] = Path(words[0]).name if words[0].endswith(("/dvc", "/mlflow")) else words[0]
    if words[0] in ("python", ".venv/bin/python") and words[1:3] == ["-m"] + words[2:3]:
        return words if words[2].startswith("dlilabs.") else None
    return words if words[0] in ("dvc", "make", "mlflow") else None


COMMANDS = all_commands()


def test_the_readme_says_how_to_enter_the_environment():
    """Before the first shell block with a command from .venv (python, dvc, mlflow not
    spelled .venv/bin/...), the README says how to enter it."""
    readme = (REPO / "README.md").read_text()
    needing = [
        block
        for block in shell_blocks(readme)
        if any(command.split()[0] in ("python", "dvc", "mlflow")
               for command in commands_in_block(block))
    ]  # fmt: skip
    assert needing, "no shell block runs python, dvc or mlflow"
    assert "source .venv/bin/activate" in readme[: readme.index(needing[0])]


def test_commands_were_found():
    kinds = {project_command(command)[0] for _, command in COMMANDS}
    assert kinds == {"python", "dvc", "make", "mlflow"}
    assert any(where == "params.yaml" for where, _ in COMMANDS)


@functools.cache
def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))


@functools.cache
def tool_help(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"python -m {module} --help: {done.stderr[-2000:]}"
    return done.stdout


def compose_overrides(overrides: list[str]) -> None:
    """Compose conf/ with `overrides` as a stage would; a sweep is composed for each value."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import dlilabs.ground.config  # noqa: F401 (resolvers, schemas)

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    variants, searched = [fixed], []
    for sweep in (o for o in parsed if o.is_sweep_override()):
        key = sweep.get_key_element()
        if sweep.is_discrete_sweep():  # a,b or choice(a,b): each value
            variants += [[*fixed, f"{key}={value}"] for value in sweep.sweep_string_iterator()]
        else:  # interval(lo,hi), an Optuna search's: the key must exist
            searched.append(key)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for variant in variants:
            cfg = compose("config", variant, return_hydra_config=True)
            for key in searched:
                assert OmegaConf.select(cfg, key) is not None, f"{key} is not in the config"


def check_python(words: list[str]) -> None:
    module = words[2]
    rest = words[3:]
    stage = module.removeprefix("dlilabs.")
    if stage in HYDRA_STAGES:
        overrides, skip = [], False
        for word in rest:
            if skip:
                skip = False
            elif word in ("--cfg", "--package", "-c", "-p"):
                skip = True  # takes a value
            elif word not in ("-m", "--multirun"):
                overrides.append(word)
        compose_overrides(overrides)
        return
    if module == "dlilabs.remote" and rest[:1] in (["push"], ["pull"]):
        # Its words after push/pull are dvc's own: DVC's parser checks them.
        from dvc.cli import parse_args

        parse_args(rest)
        return
    shown = tool_help(module)
    for word in rest:
        if word.startswith("-"):
            assert word.split("=")[0] in shown, f"{word} is not an option of python -m {module}"
    positional = [w for w in rest if not w.startswith("-")]
    if positional and re.search(r"\{[a-z,]+\}", shown):  # subcommands: {list,reconcile}
        assert positional[0] in shown, f"{positional[0]} is not a command of python -m {module}"


def check_dvc(words: list[str], tmp_path: Path) -> None:
    from dvc.cli import parse_args
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    args = parse_args(words[1:])
    for path, overrides in to_path_overrides(getattr(args, "set_param", None) or []).items():
        params = tmp_path / path
        shutil.copy(REPO / path, params)
        apply_overrides(params, overrides)  # raises on a value DVC cannot parse
        labs = yaml.safe_load(params.read_text())["labs"]
        for lab, entry in labs.items():
            compose_overrides([f"experiment={lab}", *shlex.split(entry["overrides"])])


def check_mlflow(words: list[str]) -> None:
    from mlflow.cli import cli

    context = cli.make_context("mlflow", [words[1], "--help"], resilient_parsing=True)
    command = cli.get_command(context, words[1])
    assert command is not None, f"mlflow has no command {words[1]}"
    command.make_context(words[1], list(words[2:]))


@pytest.mark.parametrize("where, command", COMMANDS)
def test_command_works_as_shown(where, command, tmp_path):
    words = project_command(command)
    if words[0] == "make":
        targets = [word for word in words[1:] if "=" not in word]
        assert set(targets) <= makefile_targets(), f"{where}: no such make target in {command}"
    elif words[0] == "python":
        check_python(words)
    elif words[0] == "dvc":
        check_dvc(words, tmp_path)
    else:
        check_mlflow(words)


def test_a_dvc_override_outside_its_grammar_fails(tmp_path):
    """The check itself, on the comment params.yaml had before (a `=` in an unquoted value)."""
    from dvc.utils.hydra import InvalidArgumentError

    old = "# Change a lab:  dvc exp run -S 'labs.asl_cnn.overrides=model.dropout=0.1'\n"
    (command,) = commands_in_comments(old)
    with pytest.raises(InvalidArgumentError, match="set-param"):
        check_dvc(shlex.split(command), tmp_path)
