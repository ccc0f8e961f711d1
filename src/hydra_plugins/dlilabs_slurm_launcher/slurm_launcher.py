"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): Hydra's submitit launcher, but a
sweep waits for every job and names the ones that ended without a result. Hydra takes
launchers only from its `hydra_plugins` package, so the class lives here and hands the work
to `dlilabs.tracking.slurm.launch` (imported when a sweep starts: Hydra imports this module
at every start-up).
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class WaitingSlurmLauncher(SlurmLauncher):
    """One SLURM array job per sweep; waits for all of its jobs (see dlilabs.tracking.slurm)."""

    def launch(self, job_overrides, initial_job_idx: int) -> Any:
        from dlilabs.tracking.slurm import launch

        return launch(self, job_overrides, initial_job_idx)
