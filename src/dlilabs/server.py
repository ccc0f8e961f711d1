"""`python -m dlilabs.server` (or `make server`): the team tracking server, PostgreSQL and
MLflow in one folder. The implementation is `dlilabs.tracking.server`."""

import sys

from dlilabs.tracking.server import main

if __name__ == "__main__":
    sys.exit(main())
