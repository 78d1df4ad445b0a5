import sys

from src.compare.cli import main

sys.exit(main())
