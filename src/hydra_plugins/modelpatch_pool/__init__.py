"""Hydra plugin of modelpatch: the ``hydra/launcher=modelpatch_pool`` launcher (a GPU pool on one machine)."""
