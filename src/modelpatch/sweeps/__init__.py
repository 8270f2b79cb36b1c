"""Sweeps: W&B parameters as Hydra overrides, sweeps without a W&B server (a sweep folder), agents on SLURM, and
the ``python -m modelpatch.sweep`` command."""
