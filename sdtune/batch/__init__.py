"""The batch CLI, `python -m sdtune.batch`: plan (a model and seed per image), engine (batched pipeline calls),
output (manifest, settings, resume) and run (accelerate-sharded)."""
