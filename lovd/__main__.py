import sys

from lovd.cli import main

sys.exit(main())
