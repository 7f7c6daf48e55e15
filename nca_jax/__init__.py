"""nca-jax: Med-NCA (two-level neural cellular automata) for lung segmentation in JAX/Flax."""

__version__ = "0.1.0"
