"""Training jobs: the queue (SQLite), each job's folder and recipe, the runner that launches the trainer in its own
process, and the live view read from the files the trainer writes. The app wires its API (api.py)."""
