"""`python -m normalcy.cli`: the `normalcy` command."""

import sys

from normalcy.cli import main

sys.exit(main())
