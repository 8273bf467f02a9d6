import sys

from flexdraft.cli import main

sys.exit(main())
