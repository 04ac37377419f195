import sys

from mriflow.cli import main

sys.exit(main())
