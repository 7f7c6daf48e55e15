"""Train Med-NCA: python train.py --out RUN [--data DIR] [--epochs N] [--seed S] [--config F]."""

from nca_jax.train_cli import cli

if __name__ == "__main__":
    cli()
