"""Data: images decoded safely, folders listed, captions and prompts read, rows screened, bucketed and split into
training and held-out sets; the data check. Imports only the shared modules."""
