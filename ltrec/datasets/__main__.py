"""`python -m ltrec.datasets`: see `ltrec.datasets.cli`."""

import sys

from ltrec.datasets.cli import main

sys.exit(main())
