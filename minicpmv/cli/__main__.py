"""`python -m minicpmv.cli ...`: the same command as `minicpmv ...`."""
import sys

from . import main

sys.exit(main())
