import sys

from qera.cli.main import main

sys.exit(main())
