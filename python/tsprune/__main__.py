"""``python -m tsprune ...`` is the ``tsprune`` command."""
import sys

from .cli import main

sys.exit(main())
