"""Prototypes kept to reproduce measured (often negative) results; not part of the library."""
