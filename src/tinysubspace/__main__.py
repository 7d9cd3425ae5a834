"""``python -m tinysubspace`` (also under ``torchrun``) is the ``tinysubspace`` command."""

import sys

from .cli import main

sys.exit(main())
