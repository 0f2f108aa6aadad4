import sys

from cxrtune.cli import main

sys.exit(main())
