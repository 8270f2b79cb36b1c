"""``python -m modelpatch.sweep``: the sweep command (``modelpatch.sweeps.command``)."""

from modelpatch.sweeps.command import main

if __name__ == "__main__":
    raise SystemExit(main())
