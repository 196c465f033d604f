"""Offline lm-eval task YAMLs (`*_local`) and their `!function` hooks (`local_files.py` and a module per
data source); see neuroal.zeroshot."""
