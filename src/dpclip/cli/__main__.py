import sys

from dpclip.cli import main

sys.exit(main())
