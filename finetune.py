"""VWSL fine-tuning: python finetune.py --run RUN --data DIR --out NEW_RUN [--epochs N]."""

from nca_jax.finetune_cli import cli

if __name__ == "__main__":
    cli()
