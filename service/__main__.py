"""`python -m ckptd.service` runs the `ckptd` command line."""

import sys

from ckptd.service.cli import main

sys.exit(main())
