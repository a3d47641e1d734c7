"""``python -m legend.federation.flower node --supernode HOST:PORT``: the node worker."""

import sys

from legend.federation.flower.node_worker import main

sys.exit(main())
