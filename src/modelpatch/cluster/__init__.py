"""Where processes run: ranks, SLURM resources, local jobs' cores, Hydra callbacks, the GPU pool. Nothing here
reaches into a run."""
