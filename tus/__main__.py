"""``python -m tus``: the ``tus`` command."""

import sys

from tus.cli.main import main

sys.exit(main())
