"""Evaluate a run: python evaluate.py --run RUN --data DIR --out OUT [--samples N] [--seed S]."""

from nca_jax.evaluate import cli

if __name__ == "__main__":
    cli()
