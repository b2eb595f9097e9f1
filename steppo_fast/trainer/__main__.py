"""``python -m steppo_fast.trainer`` = the ``steppo`` command."""

import sys

from .cli import main

sys.exit(main())
