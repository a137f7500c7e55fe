"""Training, evaluation and generation for MemMamba and its baselines."""
