"""`python -m mmlatent ...` is the `mmlatent` command."""

import sys

from mmlatent.cli import main

sys.exit(main())
