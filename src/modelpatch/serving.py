"""``python -m modelpatch.serving``: the patch-file command (``modelpatch.files.patched_model``)."""

from modelpatch.files.patched_model import main

if __name__ == "__main__":
    raise SystemExit(main())
