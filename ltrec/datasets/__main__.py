"""`python -m ltrec.datasets`: see `ltrec.datasets.commands`."""

import sys

from ltrec.datasets.commands import main

sys.exit(main())
