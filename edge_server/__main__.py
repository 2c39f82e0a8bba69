"""`python -m edge_server ...` is the same as the `edgecow` command."""

import sys

from edge_server.cli import main

sys.exit(main())
