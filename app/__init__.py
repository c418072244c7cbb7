"""Serving: ``app.predictor`` (images -> top-k classes, on torch or ONNX Runtime), ``app.images``
(decoding and preparation), the backends (``app.torch_backend``, ``app.onnx_backend``),
``app.app`` (the Gradio UI, deployable as a Hugging Face Space), ``app.export`` (what
``scripts/export.py`` ships) and ``app.loadtest`` (load-testing the app). See app/README.md."""
