"""``python -m KneeSegLogic`` is the same as the ``kneeseg`` console script."""

import sys

from .cli import main

sys.exit(main())
