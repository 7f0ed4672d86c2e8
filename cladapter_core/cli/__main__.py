"""`python -m cladapter_core.cli`: the `cladapter` command."""
import sys

from . import main

sys.exit(main())
