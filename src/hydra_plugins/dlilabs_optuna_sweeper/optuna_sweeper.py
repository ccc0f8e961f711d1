"""`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml): Hydra finds sweepers only in its
`hydra_plugins` namespace package, so this class lives here and hands every call to
`dlilabs.tracking.search.OptunaSearch`, imported when a sweep starts (Hydra imports this
module at every start-up, so it must stay cheap: no Optuna, no MLflow at import).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    """Ask an Optuna study for trials, run each as a job, tell it their objective."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.search = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from dlilabs.tracking.search import OptunaSearch

        self.search = OptunaSearch(**self.settings)
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.search is not None, "setup() first"
        return self.search.sweep(arguments)
