"""Generation: the one generation core (core.py: pipeline, prompt, seed, settings -> image), the model registry
(load once, share components, adapters on a base), serving-side compile, previews, PNG parameters, schedulers, the
local backend and run records. Every caller of a pipeline (the app, the batch CLI, metrics.py, validation during
training) goes through here."""
