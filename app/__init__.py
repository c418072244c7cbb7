"""Serving: ``app.predictor`` (images -> top-k classes, torch + Pillow only) and ``app.app``
(the Gradio UI, deployable as a Hugging Face Space; see ``app/README.md``)."""
