"""Export to TFLite: python export_tflite.py --run RUN --out F.tflite [--size 256] [--batch 1]."""

from nca_jax.export_cli import cli

if __name__ == "__main__":
    cli()
