"""FFCV loaders: shapes, dtype, channels-last layout, normalization, augmentation behaviour."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import images_of
from conftest import BETON_NAMES, CIFAR100_MEAN, CIFAR100_STD

CPU = torch.device('cpu')


def loaders(folder, *, cutout=8, translate=4, flip=True, seed=0, workers=2):
    from ffcv_pipeline.loaders import make_loader, test_pipeline, train_pipeline
    from ffcv_pipeline.ops import AugmentationState
    state = AugmentationState(seed)
    train = make_loader(folder / BETON_NAMES['train'], batch_size=100, num_workers=workers,
                        order='sequential', os_cache=True, drop_last=True, state=state,
                        pipelines=train_pipeline(device=CPU, dtype=torch.float32, state=state, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                                                 image_size=32, flip=flip, translate=translate, cutout=cutout))
    test = make_loader(folder / BETON_NAMES['test'], batch_size=100, num_workers=workers,
                       order='sequential', os_cache=True, drop_last=False,
                       pipelines=test_pipeline(device=CPU, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD))
    return train, test


def batches(loader, epoch):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]


def denorm(x: torch.Tensor) -> np.ndarray:
    """Normalized NCHW float -> uint8-valued NHWC (inverse of the pipeline's normalization)."""
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (x * std + mean).round().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope='module')
def loaded(synthetic_betons):
    train, test = loaders(synthetic_betons)
    return {'train0': batches(train, 0), 'train0_again': batches(train, 0),
            'train1': batches(train, 1), 'test': batches(test, 0)}


def test_output_shapes_dtype_layout(loaded):
    x, y = loaded['train0'][0]
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (100,) and y.dtype == torch.int64
    xt, yt = loaded['test'][0]
    assert xt.shape == (100, 3, 32, 32) and xt.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(b[1]) for b in loaded['test']) == 200  # no drop_last on test


def test_test_loading_is_exact_and_normalized(loaded, synthetic_data):
    _, _, test = synthetic_data
    x = torch.cat([b[0] for b in loaded['test']])
    y = torch.cat([b[1] for b in loaded['test']])
    np.testing.assert_array_equal(y.numpy(), test['fine_labels'])
    src = images_of(test).astype(np.float32)
    expected = (src - np.array(CIFAR100_MEAN, np.float32)) / np.array(CIFAR100_STD, np.float32)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-5)


def test_augmentation_changes_images_but_keeps_labels(loaded, synthetic_data):
    _, train, _ = synthetic_data
    x = torch.cat([b[0] for b in loaded['train0']])
    y = torch.cat([b[1] for b in loaded['train0']])
    np.testing.assert_array_equal(y.numpy(), train['fine_labels'])  # sequential order here
    aug = denorm(x)
    src = images_of(train).astype(np.float32)
    changed = (np.abs(aug - src) > 0.5).reshape(len(src), -1).any(1)
    assert changed.mean() > 0.95  # cutout alone changes every image
    # pixels stay in the uint8 range (translate/cutout fill with the mean colour)
    assert aug.min() >= -0.5 and aug.max() <= 255.5
    # every image has a cutout square of the mean colour of side >= 8
    fill = np.round(CIFAR100_MEAN)
    is_fill = (np.abs(aug - fill) < 0.5).all(-1)
    assert all(is_fill[i].sum() >= 64 for i in range(len(aug)))


def test_augmentation_is_reproducible_per_epoch_and_differs_between_epochs(loaded):
    a = torch.cat([b[0] for b in loaded['train0']])
    again = torch.cat([b[0] for b in loaded['train0_again']])
    e1 = torch.cat([b[0] for b in loaded['train1']])
    assert torch.equal(a, again)  # same (seed, epoch) -> same augmentation
    assert not torch.equal(a, e1)
    assert ((a - e1).abs().flatten(1).amax(1) > 0).float().mean() > 0.9


def test_ops_match_their_definition(synthetic_betons, synthetic_data):
    """Flip alone mirrors about half the images exactly; translate alone is a pure shift."""
    _, train, _ = synthetic_data
    src = images_of(train).astype(np.float32)
    flip_only, _ = loaders(synthetic_betons, cutout=0, translate=0, flip=True, workers=1)
    out = denorm(torch.cat([b[0] for b in batches(flip_only, 0)]))
    same = (out == src).reshape(len(src), -1).all(1)
    mirrored = (out == src[:, :, ::-1]).reshape(len(src), -1).all(1)
    assert (same | mirrored).all() and 0.35 < mirrored.mean() < 0.65

    shift_only, _ = loaders(synthetic_betons, cutout=0, translate=4, flip=False, workers=1)
    out = denorm(torch.cat([b[0] for b in batches(shift_only, 0)]))
    fill = np.round(CIFAR100_MEAN)
    for i in range(0, len(src), 37):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                exp = np.broadcast_to(fill, src[i].shape).copy()
                ys, xs = slice(max(0, -dy), min(32, 32 - dy)), slice(max(0, -dx), min(32, 32 - dx))
                exp[ys, xs] = src[i][max(0, dy):min(32, 32 + dy), max(0, dx):min(32, 32 + dx)]
                found |= np.array_equal(out[i], exp)
        assert found, i


def test_augmentation_independent_of_worker_count(synthetic_betons, loaded):
    one_thread, _ = loaders(synthetic_betons, workers=1)
    a = torch.cat([b[0] for b in batches(one_thread, 0)])
    assert torch.equal(a, torch.cat([b[0] for b in loaded['train0']]))


def test_quasi_random_order_is_a_function_of_the_epoch(synthetic_betons):
    """FFCV's own QuasiRandom shuffles in place (epoch 1 after epoch 0 != epoch 1 alone)."""
    from ffcv_pipeline.loaders import make_loader
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor

    def order(epochs):
        ld = make_loader(synthetic_betons / BETON_NAMES['train'], batch_size=50, num_workers=1,
                         order='quasi_random', os_cache=True, drop_last=True, seed=3,
                         pipelines={'image': None, 'label': [IntDecoder(), ToTensor()]})
        return [torch.cat([y.ravel().clone() for (y,) in ld.epoch(e)]).tolist() for e in epochs][-1]

    after_history, alone = order([0, 0, 1]), order([1])
    assert after_history == alone
    assert sorted(alone) == sorted(order([0])) and alone != order([0])


def test_a_last_batch_of_one_keeps_its_shape(synthetic_betons):
    """200 test images in batches of 199: the last batch holds one image (labels stay 1-D)."""
    from ffcv_pipeline.loaders import make_loader, test_pipeline
    ld = make_loader(synthetic_betons / BETON_NAMES['test'], batch_size=199, num_workers=1,
                     order='sequential', os_cache=True, drop_last=False,
                     pipelines=test_pipeline(device=CPU, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD))
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in ld.epoch(0)]
    assert shapes == [((199, 3, 32, 32), (199,)), ((1, 3, 32, 32), (1,))]


def test_indices_past_the_end_are_an_error_not_a_segfault(synthetic_betons):
    from ffcv_pipeline.loaders import make_loader, test_pipeline
    with pytest.raises(ValueError, match=r'indices must lie in \[0, 399\]'):
        make_loader(synthetic_betons / BETON_NAMES['train'], batch_size=100, num_workers=1,
                    order='sequential', os_cache=True, drop_last=False, indices=np.arange(512),
                    pipelines=test_pipeline(device=CPU, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD))


def test_a_failing_loading_thread_raises_instead_of_hanging(synthetic_betons):
    """FFCV's loading thread dies silently on an exception and its consumer waits forever; here
    it raises. The trigger is real: FFCV allocates its buffers where the epoch starts, so under
    ``torch.inference_mode`` they are inference tensors its thread may not write in place (the
    trainer evaluates under ``no_grad`` for that reason). Catches removing the guard (a hang:
    the test times out) or evaluating under inference_mode."""
    import threading
    from ffcv_pipeline.loaders import make_loader, test_pipeline
    ld = make_loader(synthetic_betons / BETON_NAMES['test'], batch_size=100, num_workers=1,
                     order='sequential', os_cache=True, drop_last=False,
                     pipelines=test_pipeline(device=CPU, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD, channels_last=False))
    result = {}

    def consume():
        try:
            with torch.inference_mode():
                result['n'] = sum(len(y) for _, y in ld.epoch(0))
        except RuntimeError as e:
            result['error'] = str(e)
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), 'the loader hung'
    assert 'FFCV loading failed' in result.get('error', '') and 'inference tensor' in result['error']
    assert sum(len(y) for _, y in ld.epoch(0)) == 200  # the loader still works afterwards


def test_leaving_an_epoch_early_joins_the_loading_thread(synthetic_betons):
    """Breaking out of an epoch (the JIT warm-up does) stops *and joins* FFCV's loading thread,
    so two loaders never run numba code at once (the workqueue threading layer aborts on that),
    also near the epoch's end. Catches a close without the join (the thread would still be
    alive here) and a join that waits on FFCV's untimed end-of-epoch put (a hang)."""
    import threading
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv_pipeline.loaders import make_loader, test_pipeline
    ld = make_loader(synthetic_betons / BETON_NAMES['test'], batch_size=20, num_workers=1,
                     order='sequential', os_cache=True, drop_last=False,
                     pipelines=test_pipeline(device=CPU, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD))
    for _ in ld.epoch(0):  # 10 batches: FFCV's thread is still producing
        break
    assert not [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]
    # leaving within the last batches: the thread has produced everything and waits to hand
    # over its end-of-epoch marker on a full queue (a plain join would wait forever)
    done = threading.Event()

    def leave_late():
        for b, _ in enumerate(ld.epoch(1)):
            if b == 6:  # 3 batches left: as many as its queue holds
                break
        done.set()
    threading.Thread(target=leave_late, daemon=True).start()
    assert done.wait(30), 'leaving the epoch near its end hung'
    assert not [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]


def test_every_loader_implements_the_one_interface_with_the_same_counts(synthetic_betons):
    """The FFCV loader, the torch loader and the resident split all satisfy
    ``ffcv_pipeline.interface.Batches`` and agree on ``num_samples`` (this process's images per
    epoch) and ``len`` for the same split and subset. Catches an implementation that drops a
    member or counts samples differently (all ranks in one, this rank in another)."""
    import numpy as np
    from ffcv_pipeline.interface import Batches
    from ffcv_pipeline.loaders import make_loader, test_pipeline
    from ffcv_pipeline.resident import ResidentSplit
    from ffcv_pipeline.torch_loader import make_torch_loader
    cpu, idx = torch.device('cpu'), np.arange(0, 200, 3)  # 67 images, batches of 20: 4 (3 full)
    ffcv_loader = make_loader(synthetic_betons / 'cifar100_test.beton', batch_size=20, num_workers=1,
                              order='sequential', os_cache=True, drop_last=False, indices=idx,
                              pipelines=test_pipeline(device=cpu, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD, channels_last=False))
    torch_loader = make_torch_loader(synthetic_betons / 'cifar100_test.npy', batch_size=20, num_workers=0,
                                     device=cpu, dtype=torch.float32, seed=0, train=False, indices=idx,
                                     mean=CIFAR100_MEAN, std=CIFAR100_STD)
    resident = ResidentSplit.from_file(synthetic_betons / 'cifar100_test.beton', indices=idx, device=cpu,
                                       dtype=torch.float32, batch_size=20, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    for impl in (ffcv_loader, torch_loader, resident):
        assert isinstance(impl, Batches), type(impl).__name__
        assert impl.num_samples == 67 and len(impl) == 4, type(impl).__name__
        assert sum(int((y >= 0).sum()) for _, y in impl.epoch(0)) == 67
        impl.close()
