"""`python -m fastsam_core ...`: the `fastsam` command line."""

import sys

from fastsam_core.cli import main

sys.exit(main())
