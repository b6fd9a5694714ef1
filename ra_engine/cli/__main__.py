"""`python -m ra_engine.cli` (and `torchrun ... -m ra_engine.cli`): the `ra` command."""
import sys

from ra_engine.cli import main

sys.exit(main())
