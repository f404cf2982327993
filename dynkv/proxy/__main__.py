"""``python -m dynkv.proxy [options]``: the same as ``dynkv proxy`` (the launch scripts run it so)."""

import sys

from dynkv.proxy.server import main

sys.exit(main())
