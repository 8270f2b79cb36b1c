"""A pool job's process: ``python -m hydra_plugins.modelpatch_pool.job <job file> <result file>`` runs one Hydra
job of the project's config (``modelpatch.cluster.pool.run_job_file``), its ``${mp.*:}`` resolvers registered."""

import sys

import modelpatch.resolvers  # noqa: F401  (the job's config uses the mp.* resolvers)
from modelpatch.cluster.pool import run_job_file

if __name__ == "__main__":
    sys.exit(run_job_file(*sys.argv[1:3]))
