"""The app, behind gradio_app.py: flags and launch, the service every tab and API endpoint calls (service.py),
compare, recall (PNG info), the Ray backend; the Gradio UI in ui/."""
