"""The ONNX Runtime backend of ``app.predictor``: a ``model.onnx`` written by
``scripts/export.py --onnx``, served without torch (a Space needs only gradio, onnxruntime,
numpy and pillow). The class names, normalization and training results travel inside the file
(``metadata_props``, see ``app.modelmeta``).

    python scripts/predict.py cifar32.png --checkpoint export/model.onnx --benchmark 200
    -> see docs/BENCHMARKS.md "Export / ONNX" for p50 against torch eager and compiled

Session options (measured on the 2-core EPYC, docs/BENCHMARKS.md "Export / ONNX"): all graph
optimizations (ORT_ENABLE_ALL: fusions and the NCHWc layout; 1.6x faster than EXTENDED), one
intra-op thread per core (2 threads: 6.6 ms forward, 1 thread: 12.2 ms), no spin-waiting.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:
    from .modelmeta import META_KEY, ModelFileError, ModelMeta
except ImportError:  # a flat Space folder: this file's folder is on sys.path
    from modelmeta import META_KEY, ModelFileError, ModelMeta

EXPORT_HINT = '`python scripts/export.py runs/<run>/best.pt --out DIR --onnx`'


def session_options(optimize: bool = True, num_threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # the CPUs this process may use (a container's affinity), not the host's count
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    opts.intra_op_num_threads = num_threads or usable or 1
    opts.inter_op_num_threads = 1  # one sequential graph: no parallel branches to run
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No spin-waiting between ops: +0.5 ms idle (7.0 -> 7.5 ms forward), but next to one busy
    # core 10.6 ms instead of 15 (p95 14 vs 26 ms); a server shares the CPU with Gradio.
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    opts.log_severity_level = 3  # errors only: no warnings about unused initializers
    return opts


class OnnxBackend:
    """``path``: an ONNX model with this project's metadata. ``optimize``: ORT's full graph
    optimizations (default) or none; ``num_threads``: intra-op threads (default: all cores)."""
    name = 'onnx'

    def __init__(self, path: str | os.PathLike, *, optimize: bool = True,
                 num_threads: int | None = None, **_ignored):
        path = Path(path)
        if path.is_dir():  # a model repository or Space folder: the model.onnx in it
            path = path / 'model.onnx'
        if not path.is_file():
            raise ModelFileError(f'{path}: no such model file')
        try:
            self.session = ort.InferenceSession(str(path), session_options(optimize, num_threads),
                                                providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own types for bad protobufs and graphs
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
            raise ModelFileError(f'{path}: not a readable ONNX model ({type(e).__name__}: '
                                 f'{first})') from None
        meta_json = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if meta_json is None:
            raise ModelFileError(f'{path}: an ONNX model without this project\'s metadata (class '
                                 f'names, normalization); export one with {EXPORT_HINT}')
        self.meta = ModelMeta.from_json(meta_json, str(path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
            raise ModelFileError(f'{path}: expected one N x 3 x H x W input, found '
                                 f'{[(i.name, i.shape) for i in inputs]}')
        self._input, self._output = inputs[0].name, outputs[0].name
        classes = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(classes, int) and classes != len(self.meta.class_names):  # e.g. metadata of another model
            raise ModelFileError(f'{path}: {len(self.meta.class_names)} class names for a {classes}-class model '
                                 f'(tensor {outputs[0].name} is {" x ".join(map(str, outputs[0].shape))})')
        self.meta.check(str(path))
        self.description = f'ONNX Runtime {ort.__version__}'
        size = self.meta.image_size
        self.logits(np.zeros((1, 3, size, size), np.float32))  # warm-up: allocate, pick kernels

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Normalized N x 3 x H x W float32 -> N x classes float32 logits."""
        # onnxruntime reads the buffer as contiguous NCHW: copy the channels-last view once
        return self.session.run([self._output], {self._input: np.ascontiguousarray(x)})[0]
