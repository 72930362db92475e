"""Control plane: configuration, the ``ragtune`` CLI, local cluster start, job submission, models."""
