"""``python -m modelpatch.report``: the report command (``modelpatch.reporting.report``)."""

from modelpatch.reporting.report import main

if __name__ == "__main__":
    raise SystemExit(main())
