"""``python -m paramserver`` runs the command line."""

import sys

from paramserver.cli import main

sys.exit(main())
