"""The paper's experiments on our data: one script per study, sharing experiments.common."""
