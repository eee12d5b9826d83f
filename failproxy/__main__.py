"""`python -m failproxy` is the same program as the `failproxy` script."""

import sys

from failproxy.cli import main

sys.exit(main())
