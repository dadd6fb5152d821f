"""Where images come from and how training perturbs them."""
