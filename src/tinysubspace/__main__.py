"""``python -m tinysubspace`` (also under ``torchrun``) is the ``tinysubspace`` command."""

import sys

from tinysubspace.cli.main import main

sys.exit(main())
