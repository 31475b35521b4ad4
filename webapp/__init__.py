"""The local web demo behind app.py: `backend` (pure functions over a loaded model) and `ui` (the Gradio page)."""
