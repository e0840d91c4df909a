"""``python -m routerd.ctl``: routerctl without the installed console script."""

import sys

from routerd.ctl.commands import main

sys.exit(main())
