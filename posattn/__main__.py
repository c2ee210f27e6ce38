import sys

from posattn.cli import main

sys.exit(main())
