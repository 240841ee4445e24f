"""`python -m lfm` is the `lfm` command."""

import sys

from lfm.cli.main import main

sys.exit(main())
