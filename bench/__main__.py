"""`python -m bench` is the `zsad-bench` command."""

import sys

from bench.cli import main

sys.exit(main())
