"""`python -m bazar.bench`: the same as the `bazar-bench` command."""

import sys

from bazar.bench.cli import main

sys.exit(main())
