"""Every change this project makes to another package's code (ffcv 1.0.2's; numba's and torch's
while ffcv or the optimizer is set up), in one place.

Each patch names the ffcv internals it relies on; :func:`check` verifies them against the
installed ffcv, and ``tests/test_ffcv_patches.py`` fails, naming the assumption, when an ffcv
upgrade breaks one (re-read the patch against the new ffcv, then update :data:`FFCV_VERSION`).

1. :func:`apply_loader_patches` (on importing ``loaders``; idempotent): two repairs to FFCV's
   loading thread, ``ffcv/loader/epoch_iterator.py``, so that an epoch can be left early (the
   JIT warm-up, a Ctrl-C, an error) and its thread joined at once.
   a. ``EpochIterator.run`` waits forever, on a full queue, to hand over its end-of-epoch
      marker (``self.output_queue.put(None)`` after ``StopIteration``): a consumer that left
      the epoch within its last few batches never takes it, and joining the thread hangs
      (seen with the 4-batch test set of cpu_small.yaml). The module's ``Queue`` name (what
      ``EpochIterator.__init__`` builds ``output_queue`` from) becomes :class:`_ClosableQueue`,
      whose blocking puts give up once the iterator's ``terminate_event`` is set (checked every
      20 ms).
   b. ``EpochIterator.run`` dies silently on an exception, and its consumer then waits forever
      for the next batch. The wrapped ``run`` records the exception as ``self.error`` and ends
      the epoch (puts ``None``); ``CifarLoader.epoch`` raises it.
2. :func:`stable_quasi_random` (per loader): ``QuasiRandom.sample_order`` shuffles its
   ``page_to_samples_array`` (built by ``prepare_data_structures``) *in place*, so the order of
   epoch e depends on which epochs were drawn before it; a resumed run would see other batches
   than an uninterrupted one. :class:`StableQuasiRandom` draws every epoch from a pristine copy.
   ``Loader(order=...)`` cannot take a custom class (its isinstance check rejects classes, and
   instances are not callable), so the loader's ``traversal_order`` and ``first_traversal_order``
   (from ``next_traversal_order()``) are replaced after construction.
3. :func:`writer_hooks` (per ``.beton`` written): ``DatasetWriter`` shows a bare ``tqdm`` bar,
   starts ``multiprocessing.Process`` workers and allocates its metadata in ``shared_memory``,
   all through names in ``ffcv.writer``'s namespace; they are replaced by a named, switchable
   bar, the watchdog's process class (which records the workers and makes them die with the
   converter, ``watchdog.py``) and a segment named after this process (freed by a later run).
4. In :func:`apply_loader_patches`: ``ffcv.traversal_order.quasi_random.generate_order_inner``
   (a module-level ``@njit``) gets numba's on-disk cache (``enable_caching``).
5. :func:`keep_torch_threads` (from ``load_ffcv``, once ffcv is imported):
   ``ffcv.pipeline.compiler.Compiler.set_num_threads`` sets torch's intra-op thread count as
   well as numba's, at ffcv's import (to 1) and whenever a ``Loader`` is built or an epoch
   starts (to its ``num_workers``). Torch's count then depended on whether ffcv had been
   imported: a process that had imported it trained on 1 thread (and other bits) where a fresh
   one used every core. The patched classmethod sets numba's threads only; torch's count is put
   back to what it was before ffcv was imported.
0. :func:`import_ffcv_without_typed_dict` (from ``load_ffcv``, before ffcv is first imported):
   ``ffcv/fields/rgb_image.py`` builds ``IMAGE_MODES = numba.typed.Dict()`` at import, which
   compiles numba's typed-dict machinery in every process that imports ffcv (ffcv's own modules
   all import it). The table maps 'jpg'/'raw' to 0/1 and is only read from Python
   (``generate_code`` captures the ints; ``encode`` runs in Python), so a plain dict behaves the
   same: ``numba.typed.Dict`` is ``dict`` for the duration of that one import. Saves 3.6 s per
   process that imports ffcv (importing it as ``load_ffcv`` does: 2.25 s with the patch, 5.84 s
   without, medians of 5 alternating runs, 2 shared cores, 2026-12-04).
6. :func:`eager_optimizer` (torch, not ffcv: ``training/optim.py`` builds every optimizer through
   it unless the model is compiled): torch.optim imports ``torch._dynamo`` at the first call of its
   methods only to tell the compiler what not to trace. Saves 1.6 s per training process (one
   that builds the optimizer and takes 3 steps: 2.25 s with the patch, 3.86 s without, medians of
   5 alternating runs, same machine and day).

Every patch here changes another package's code; none lives anywhere else in the project (the
measured seconds each one saves stand beside it: a patch that saves nothing goes). ``check``
and ``check_torch`` verify what each relies on.
"""
from __future__ import annotations

import inspect
import queue
import time

FFCV_VERSION = '1.0.2'  # the release these patches were written against and tested with


# --- 0. ffcv's import without numba's typed dict -------------------------------------------------
def import_ffcv_without_typed_dict() -> None:
    """Patch 0: import ``ffcv.fields.rgb_image`` with ``numba.typed.Dict`` = ``dict`` (numba's
    own restored after); nothing if it is imported already."""
    import sys
    if 'ffcv.fields.rgb_image' in sys.modules:
        return
    import numba.typed
    saved = vars(numba.typed).get('Dict')  # numba loads its Dict lazily: maybe not yet there
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        if saved is None:
            del numba.typed.Dict
        else:
            numba.typed.Dict = saved


# --- 1. the loading thread -----------------------------------------------------------------------
class _ClosableQueue(queue.Queue):
    closed = None  # the EpochIterator's terminate_event, set when its thread starts

    def put(self, item, block=True, timeout=None):
        if not block or self.closed is None:
            return super().put(item, block, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return super().put(item, timeout=0.02)
            except queue.Full:
                if self.closed.is_set():
                    if timeout is None:
                        return  # the end-of-epoch marker: nobody will read it
                    raise  # FFCV's own put loop checks for the close after a Full
                if deadline is not None and time.monotonic() >= deadline:
                    raise


def _run_repaired(self):
    self.output_queue.closed = self.terminate_event
    try:
        _run_repaired.ffcv_run(self)
    except BaseException as e:
        self.error = e
        self.output_queue.put(None)


def apply_loader_patches() -> None:
    """Patch 1 (a and b); a second call (or a reload of this module) changes nothing."""
    import ffcv.loader.epoch_iterator as module
    run = module.EpochIterator.run
    _run_repaired.ffcv_run = getattr(run, 'ffcv_run', run)  # ffcv's own, even if patched before
    module.EpochIterator.run = _run_repaired
    module.Queue = _ClosableQueue
    # 4. FFCV's quasi-random order is a module-level numba function (no closure over data)
    # compiled in every process (1.2 s on our 2 cores): numba may keep its machine code on disk
    import ffcv.traversal_order.quasi_random as qr
    qr.generate_order_inner.enable_caching()


# --- 2. a reproducible quasi-random order --------------------------------------------------------
def _stable_quasi_random_class():
    from ffcv.traversal_order import QuasiRandom

    class StableQuasiRandom(QuasiRandom):
        """QuasiRandom whose epoch e's order does not depend on the epochs drawn before it."""

        def prepare_data_structures(self):
            super().prepare_data_structures()
            self._pristine = self.page_to_samples_array.copy()

        def sample_order(self, epoch: int):
            self.page_to_samples_array = self._pristine.copy()
            return super().sample_order(epoch)

    return StableQuasiRandom


_STABLE = []  # the class, made once on first use (subclassing imports ffcv)


def stable_quasi_random(loader) -> None:
    """Patch 2 on one ``ffcv.loader.Loader``: swap its quasi-random order for the stable one."""
    from ffcv.traversal_order import QuasiRandom
    if type(loader.traversal_order) is not QuasiRandom:
        return
    if not _STABLE:
        _STABLE.append(_stable_quasi_random_class())
    loader.traversal_order = _STABLE[0](loader)
    loader.first_traversal_order = loader.next_traversal_order()


# --- 3. the writer's progress bar and worker processes --------------------------------------------
def writer_hooks(*, progress_bar, process_class, shared_memory=None) -> None:
    """Patch 3: ``DatasetWriter`` (from here on) uses ``progress_bar(total=...)`` for its bar,
    ``process_class(target=..., args=...)`` for its workers and ``shared_memory(create=True,
    size=...)`` for its metadata segment (``ffcv.writer.shared_memory``)."""
    import ffcv.writer
    ffcv.writer.tqdm = progress_bar
    ffcv.writer.Process = process_class
    if shared_memory is not None:
        ffcv.writer.shared_memory = shared_memory


# --- 5. torch's thread count is torch's -------------------------------------------------------------
def _numba_threads_only(cls, n):
    from multiprocessing import cpu_count
    import numba
    n = n if n >= 1 else cpu_count()  # ffcv's own rule, less its torch.set_num_threads(n)
    cls.num_threads = n
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def keep_torch_threads(torch_threads: int | None) -> None:
    """Patch 5: ``Compiler.set_num_threads`` leaves torch alone from here on, and torch gets
    back the ``torch_threads`` it had before ffcv's import set it to 1 (None: unknown, as ffcv
    was imported before ``load_ffcv``; left as it is). Once: a second call, or one after a
    reload of this module, changes nothing."""
    import torch
    from ffcv.pipeline.compiler import Compiler
    if Compiler.set_num_threads.__func__.__name__ != _numba_threads_only.__name__:
        _numba_threads_only.ffcv_source = inspect.getsource(Compiler.set_num_threads)  # for check()
        Compiler.set_num_threads = classmethod(_numba_threads_only)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)


# --- 6. no torch._dynamo in an eager run (torch) ----------------------------------------------
def _prefill_dynamo_disable(cls: type) -> None:
    """Fill ``torch._compile._disable_dynamo``'s per-function cache with the function itself for
    ``cls``'s methods and its module's functions, so that calling them imports nothing."""
    import sys
    import torch._compile
    inner_code = torch._compile._disable_dynamo(lambda: None).__code__
    seen = set()

    def prefill(obj, depth=0):
        if id(obj) in seen or depth > 3 or getattr(obj, '__code__', None) is None:
            return
        seen.add(id(obj))
        cells = dict(zip(obj.__code__.co_freevars, obj.__closure__ or ()))
        if obj.__code__ is inner_code:
            fn = cells['fn'].cell_contents
            if getattr(fn, '__dynamo_disable', None) is None:
                setattr(fn, '__dynamo_disable', fn)
            return
        for cell in cells.values():  # e.g. the functional SGD's fallback wrapper
            try:
                prefill(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
    for c in cls.__mro__:  # the class's methods, and its modules' functional kernels (AdamW's
        for obj in [*vars(c).values(), *vars(sys.modules[c.__module__]).values()]:  # are Adam's)
            prefill(obj)


def eager_optimizer(cls: type, *args, **kwargs):
    """``cls(*args, **kwargs)`` that never imports ``torch._dynamo`` (0.9 s on our 2-core machine).

    torch.optim imports ``torch._dynamo`` at the first call of its methods only to tell the
    compiler what not to trace: ``step`` runs through ``_use_grad_for_differentiable`` (imports
    it on every call, for two ``graph_break()``s, no-ops in eager mode), and ``zero_grad``,
    ``add_param_group`` (called by the constructor) and the functional SGD kernels through
    ``torch._compile._disable_dynamo``, which caches ``torch._dynamo.disable(fn)`` as
    ``fn.__dynamo_disable``. Nothing is traced in an eager run, so those caches hold the functions
    themselves, and this optimizer's ``step`` is the undecorated one under ``torch.no_grad()``
    (what the decorator does, less the graph breaks and the profiler-hook wrapper -- so optimizer
    step pre/post hooks, global or registered on this optimizer, do not run: nothing here
    registers any; a caller that does builds its optimizer with ``eager=False``). Written
    against torch 2.11-2.14; :func:`check_torch` reads the wrappers it relies on, and
    tests/test_time_budget.py checks that training steps import no ``torch._dynamo``. Not for ``training.compile``."""
    import sys
    import torch
    if 'torch._dynamo' in sys.modules:  # imported anyway (compile, or the caller): no gain
        return cls(*args, **kwargs)
    _prefill_dynamo_disable(cls)
    optimizer = cls(*args, **kwargs)
    raw = cls.step
    while hasattr(raw, '__wrapped__'):  # profile-hook wrapper -> _use_grad -> SGD.step
        raw = raw.__wrapped__

    def step(closure=None):
        with torch.no_grad():
            return raw(optimizer, closure)
    optimizer.step = step  # an instance attribute: GradScaler.step calls it too
    return optimizer


# --- the assumptions, checked ---------------------------------------------------------------------
def check() -> list[str]:
    """What no longer holds in the installed ffcv, one line each (empty: every patch fits)."""
    from importlib.metadata import PackageNotFoundError, version
    import ffcv.loader.epoch_iterator as ei
    import ffcv.loader.loader as ld
    import ffcv.traversal_order.quasi_random as qr
    import ffcv.writer as wr

    problems = []

    def need(ok: bool, what: str):
        if not ok:
            problems.append(what)

    try:
        installed = version('ffcv')
    except PackageNotFoundError:
        installed = 'unknown'
    need(installed == FFCV_VERSION, f'ffcv is {installed}, the patches were written against '
                                    f'{FFCV_VERSION}: re-check each one in ffcv_patches.py')
    run = getattr(ei.EpochIterator.run, 'ffcv_run', ei.EpochIterator.run)
    src = inspect.getsource(run)
    need('self.output_queue.put(None)' in src and 'except StopIteration' in src,
         '1a: EpochIterator.run no longer ends an epoch with output_queue.put(None) after StopIteration')
    need('self.terminate_event.is_set()' in src,
         '1a: EpochIterator.run no longer checks terminate_event after a full queue')
    init = inspect.getsource(ei.EpochIterator.__init__)
    need('self.output_queue = Queue(' in init and hasattr(ei, 'Queue'),
         '1a: EpochIterator.__init__ no longer builds output_queue from the module name Queue')
    need('self.terminate_event = Event()' in init,
         '1a/1b: EpochIterator no longer has a terminate_event')
    sample = inspect.getsource(qr.QuasiRandom.sample_order)
    prep = inspect.getsource(qr.QuasiRandom.prepare_data_structures)
    need('self.page_to_samples_array' in sample and 'self.page_to_samples_array =' in prep,
         '2: QuasiRandom no longer draws from page_to_samples_array built in prepare_data_structures')
    loader_src = inspect.getsource(ld.Loader)
    need('self.first_traversal_order = self.next_traversal_order()' in loader_src
         and 'self.traversal_order' in inspect.getsource(ld.Loader.next_traversal_order),
         '2: Loader no longer keeps first_traversal_order from traversal_order.sample_order')
    import ffcv.fields.rgb_image as rgb
    need(dict(rgb.IMAGE_MODES) == {'jpg': 0, 'raw': 1},
         '0: ffcv.fields.rgb_image.IMAGE_MODES is no longer the table {jpg: 0, raw: 1} load_ffcv assumes')
    need(hasattr(qr.generate_order_inner, 'enable_caching'),
         '4: quasi_random.generate_order_inner is no longer a numba dispatcher')
    import ffcv.pipeline.compiler as comp
    set_threads = comp.Compiler.set_num_threads.__func__
    own = getattr(set_threads, 'ffcv_source', None) or inspect.getsource(set_threads)
    need(own.count('set_num_threads(n)') == 2 and 'cls.num_threads = n' in own,
         '5: Compiler.set_num_threads no longer just sets cls.num_threads, numba\'s and torch\'s threads')
    need('Compiler.set_num_threads(' in inspect.getsource(ld.Loader.__init__),
         '5: Loader no longer sets the threads through Compiler.set_num_threads')
    need(hasattr(wr, 'shared_memory'), '3: ffcv.writer no longer allocates through the name shared_memory')
    write = inspect.getsource(wr.DatasetWriter._write_common)
    need(hasattr(wr, 'tqdm') and 'tqdm(total=' in write,
         '3: DatasetWriter no longer makes its bar with the module name tqdm(total=...)')
    need(hasattr(wr, 'Process') and 'Process(target=' in write,
         '3: DatasetWriter no longer starts workers with the module name Process(target=...)')
    return problems + check_torch()


def check_torch() -> list[str]:
    """What patch 6 relies on in the installed torch, one line per change (needs no ffcv)."""
    import torch
    import torch._compile
    problems = []
    src = inspect.getsource(torch._compile._disable_dynamo)
    if '__dynamo_disable' not in src or 'import torch._dynamo' not in src:
        problems.append('6: torch._compile._disable_dynamo no longer caches torch._dynamo.disable(fn) '
                        'as fn.__dynamo_disable')
    inner = torch._compile._disable_dynamo(lambda: None)
    if 'fn' not in inner.__code__.co_freevars:
        problems.append('6: _disable_dynamo\'s wrapper no longer closes over fn')
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        raw = cls.step
        while hasattr(raw, '__wrapped__'):
            raw = raw.__wrapped__
        if raw.__name__ != 'step' or raw.__qualname__.split('.')[0] not in {c.__name__ for c in cls.__mro__}:
            problems.append(f'6: {cls.__name__}.step\'s wrappers no longer lead to the step itself')
    return problems
