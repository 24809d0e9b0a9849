"""``python -m KneeSegLogic`` is the same as the ``kneeseg`` console script."""

import sys

from KneeSegLogic.commands.main import main

sys.exit(main())
