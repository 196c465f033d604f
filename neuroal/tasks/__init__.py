"""Offline lm-eval task YAMLs (`*_local`) and their `!function` hooks (`utils.py`); see neuroal.zeroshot."""
