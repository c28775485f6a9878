"""`python -m phd` (and `torchrun -m phd train`): the `phd` command."""

import sys

from .commands import main

sys.exit(main())
