"""`python -m minicpmv ...`: the same command as `minicpmv ...`."""
import sys

from .cli import main

sys.exit(main())
