"""Training a run: the run's driver, the trainer, its steps and what makes them fast."""
