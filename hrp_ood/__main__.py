import sys

from hrp_ood.cli import main

sys.exit(main())
