"""The app's Gradio UI: the Blocks and their tabs, wired to the service (sdtune/app/service.py)."""
