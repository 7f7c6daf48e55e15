"""Speed benchmark: python bench.py [--size 256] [--steps 50] [--batch 4 16] --json OUT.json."""

from nca_jax.bench import cli

if __name__ == "__main__":
    cli()
