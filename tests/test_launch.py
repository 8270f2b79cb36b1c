"""Launch helpers: how many jobs a sweep makes, and the threads each local job gets."""

import pytest

from modelpatch.cluster.jobs import CONCURRENT_JOBS_ENV, count_sweep_jobs, threads_per_job


def test_count_sweep_jobs_multiplies_the_swept_values():
    assert count_sweep_jobs(["patch=bn,dw,full", "seed=0,1", "task=digits"]) == 6
    assert count_sweep_jobs(["task=digits"]) == 1
    assert count_sweep_jobs(["patch=bn,dw,full", "seed=0,1"], max_batch_size=4) == 4  # the first batch


@pytest.mark.parametrize(
    ("threads", "env", "expected"),
    [
        (3, {}, 3),  # set in the config: always wins
        (None, {}, None),  # a plain run: torch's default
        (None, {CONCURRENT_JOBS_ENV: "4"}, None),  # not a local submitit job
        (None, {CONCURRENT_JOBS_ENV: "4", "SUBMITIT_EXECUTOR": "local"}, 2),
        (None, {CONCURRENT_JOBS_ENV: "16", "SUBMITIT_EXECUTOR": "local"}, 1),
        (None, {CONCURRENT_JOBS_ENV: "2", "SUBMITIT_EXECUTOR": "slurm"}, None),
    ],
)
def test_threads_per_job(monkeypatch, threads, env, expected):
    for key in (CONCURRENT_JOBS_ENV, "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert threads_per_job(threads, cores=8) == expected
