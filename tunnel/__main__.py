"""``python -m tunnel``: the same as the ``tunnel`` command."""

import sys

from tunnel.cli import main

if __name__ == "__main__":
    sys.exit(main())
