"""How long importing ffcv's fields takes with and without a plain dict for IMAGE_MODES.

    python docs/bench/ffcv_import_probe.py          # ffcv's own import (typed Dict compiled)
    python docs/bench/ffcv_import_probe.py patch    # what ffcv_pipeline.load_ffcv does
"""
import sys
import time

t0 = time.perf_counter()
import numba.typed  # noqa: E402
if sys.argv[1:] == ['patch']:
    numba.typed.Dict = dict
import ffcv.fields.rgb_image  # noqa: E402,F401
print('import ffcv.fields', round(time.perf_counter() - t0, 2), 's')
