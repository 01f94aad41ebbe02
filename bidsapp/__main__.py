"""Allow ``python -m bidsapp``."""

from bidsapp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
