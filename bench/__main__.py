"""`python -m bench [all|core|shm|models|outside|startup|soak] [--quick]`: see bench/README.md."""

import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())
