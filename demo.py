"""End-to-end demo on the embedded phantoms: python demo.py --out demo-out."""

from nca_jax.demo import cli

if __name__ == "__main__":
    cli()
