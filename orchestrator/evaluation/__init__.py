"""Evaluation: perplexity through the shards (`perplexity`), lm-eval tasks on the checkpoint (`zeroshot`),
and the jobs that run them for a prune, a finished run or any model (`jobs`)."""
