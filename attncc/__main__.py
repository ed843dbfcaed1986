"""``python -m attncc`` runs the CLI."""

import sys

from attncc.cli import main

sys.exit(main())
