"""The Gradio web app behind app.py: its controls (from the one declaration of options), jobs and page."""
