"""The local web app over a run."""
