"""`python -m dlilabs.server` (or `make server`): the team tracking server, PostgreSQL and
MLflow in one folder. The implementation is `dlilabs.tracking.teamserver`."""

import sys

from dlilabs.tracking.teamserver import main

if __name__ == "__main__":
    sys.exit(main())
