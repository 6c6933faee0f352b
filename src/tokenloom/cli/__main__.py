"""`python -m tokenloom.cli VERB ...` is `tokenloom VERB ...`."""

import sys

from . import main

sys.exit(main())
