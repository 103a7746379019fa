"""``python -m infergate_worker`` is the ``infergate-worker`` command."""

import sys

from infergate_worker.cli import main

sys.exit(main())
