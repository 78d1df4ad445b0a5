import sys

from src.rank.cli import main

sys.exit(main())
