"""`python -m tokenloom VERB ...` is `tokenloom VERB ...` (and `torchrun ... -m tokenloom train ...`)."""

import sys

from .cli import main

sys.exit(main())
