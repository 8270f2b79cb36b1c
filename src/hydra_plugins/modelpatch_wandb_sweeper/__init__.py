"""modelpatch's Hydra sweeper plugin: W&B sweep files run by W&B's engine, without a W&B server."""
