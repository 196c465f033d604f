"""One prune, end to end (`job`): allocation evidence collected on the shards (`evidence`), the saved
allocation a rerun resumes from (`resume`), and the checkpoint written where the run folder is (`checkpoint`)."""
