"""Reading SLURM's job list without a cluster: pending array tasks share one record."""

from dlilabs.tracking.slurm import array_tasks, varying


def test_array_task_lists_expand_as_slurm_writes_them():
    assert array_tasks("3") == [3]
    assert array_tasks("2-4,7%2") == [2, 3, 4, 7]  # a throttled list of pending tasks
    assert array_tasks("[5-6]") == [5, 6]  # sacct's form


def test_a_lost_job_is_named_by_what_varies_in_its_sweep():
    jobs = [["lab=x", "model.dropout=0.1", "seed=1"], ["lab=x", "model.dropout=0.3", "seed=1"]]
    assert varying(jobs, 1) == ["model.dropout=0.3"]
    assert varying(jobs[:1], 0) == jobs[0]  # one job: all of its overrides
