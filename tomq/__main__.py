import sys

from tomq.cli import main

sys.exit(main())
