"""``python -m modulart``: the same as the ``modulart`` command."""

import sys

from modulart.cli import main

sys.exit(main())
