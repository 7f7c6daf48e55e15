"""Speed benchmark: python bench.py [--size 256] [--steps 50] [--batch 4 16] --json OUT.json."""

import sys

from nca_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
