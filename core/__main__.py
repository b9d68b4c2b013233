"""`python -m medtune` is the same as the `medtune` console script."""

import sys

from medtune.cli import main

sys.exit(main())
