"""Evaluation, behind metrics.py: its flags, the run, CLIP score, CMMD, reference images, statistics and the
report."""
