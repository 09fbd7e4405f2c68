"""The device input pipeline (uint8 cache, augmentation on the device) against the CPU path, on a CPU device:
bitwise the same views, a task's images decoded once, a bounded cache, a resized cache within a measured
tolerance, and the loop giving the same run with either pipeline."""
import numpy as np
import pytest
import torch

from helpers import tiny_overrides
from inflora_ray.config import ConfigError
from inflora_ray.data.device_pipeline import DevicePipeline, cached_size, resolve_pipeline
from inflora_ray.data.loader import TaskDataset, make_loader, pass_batches, train_batches
from inflora_ray.data.transforms import Preprocess
from inflora_ray.presets import load_config


class _Images:
    """Images of different sizes in memory (as decoded JPEGs of a folder would be)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        sizes = [(int(h), int(w)) for h, w in torch.randint(20, 61, (n, 2), generator=g)]
        self.images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
        self.labels = np.arange(n, dtype=np.int64) % 4
        self.loads = 0

    def __len__(self):
        return len(self.images)

    def load(self, index):
        self.loads += 1
        return self.images[index]


PP = Preprocess(img_size=24, train_scale=(0.08, 1.0), train_ratio=(3 / 4, 4 / 3), train_flip=True,
                test_resize=28, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _dataset(n=40):
    return TaskDataset(_Images(n), PP, np.array([2, 0, 3, 1]))


def _cpu(dataset, batches):
    return [(x.clone(), y.clone()) for x, y in make_loader(dataset, batches)]


def _dev(pipe, batches):
    return [(x.clone(), y.clone()) for x, y in pipe.loader(batches)]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype and xa.shape == xb.shape
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_views_are_bitwise_the_cpu_paths_and_a_task_is_decoded_once(workers):
    ds = _dataset(50)
    idx = np.arange(40)  # this task's samples
    pipe = DevicePipeline(ds, torch.device("cpu"), cache_bytes=1 << 30, loader_workers=workers)
    cov = pass_batches(idx, 16, seed=3, task=0, aug_stream=-1)  # a covariance pass first, as in the loop
    _same(_dev(pipe, cov), _cpu(ds, cov))
    assert pipe.decoded == 40 and len(pipe._cache) == 40
    for epoch in range(2):  # epochs (empty batches included) read the cache only
        batches = train_batches(idx, 2, seed=3, task=0, epoch=epoch, rank=1, world_size=3)
        assert any(len(b) == 0 for b in batches)
        _same(_dev(pipe, batches), _cpu(ds, batches))
    test = pass_batches(idx, 16)  # the test transform (seed -1) too
    _same(_dev(pipe, test), _cpu(ds, test))
    assert pipe.decoded == 40
    # the next task's samples start a new group, decoded once
    nxt = pass_batches(np.arange(30, 50), 4, seed=3, task=1)
    _same(_dev(pipe, nxt), _cpu(ds, nxt))
    assert pipe.decoded == 60 and len(pipe._cache) == 20


def test_a_bounded_cache_decodes_the_rest_again_with_the_same_views():
    ds = _dataset()
    idx = np.arange(len(ds))
    budget = sum(int(img.numel()) for img in ds.source.images[:15])
    pipe = DevicePipeline(ds, torch.device("cpu"), cache_bytes=budget)
    batches = train_batches(idx, 8, seed=1, task=2, epoch=0)
    _same(_dev(pipe, batches), _cpu(ds, batches))
    assert 0 < len(pipe._cache) < len(ds) and sum(int(t.numel()) for t, _ in pipe._cache.values()) <= budget
    first = pipe.decoded
    _same(_dev(pipe, batches), _cpu(ds, batches))
    assert pipe.decoded - first == len(ds) - len(pipe._cache)


def test_a_resized_cache_stays_close_to_the_cpu_path():
    ds = _dataset()
    idx = np.arange(len(ds))
    assert cached_size(60, 30, 24) == (48, 24) and cached_size(20, 30, 24) == (20, 30)
    assert cached_size(25, 37, 24) == (24, 35)  # the long side rounded down, as torchvision resize does
    pipe = DevicePipeline(ds, torch.device("cpu"), cache_bytes=1 << 30, cache_side=24)
    batches = train_batches(idx, 8, seed=1, task=0, epoch=0)
    got, want = _dev(pipe, batches), _cpu(ds, batches)
    diff = torch.cat([(a - b).abs().flatten() for (a, _), (b, _) in zip(got, want)])
    # Normalised units (std 0.2-0.3); on random-noise images, the worst case for an extra resize.
    assert 0 < float(diff.mean()) < 0.6
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(got, want))
    # A cache at the test resize gives bitwise the CPU path's test views.
    test = pass_batches(idx, 16)
    _same(_dev(DevicePipeline(ds, torch.device("cpu"), cache_bytes=1 << 30, cache_side=PP.test_resize), test),
          _cpu(ds, test))


def test_pipeline_choice_is_validated_and_auto_means_device_on_cuda_only():
    assert resolve_pipeline("auto", torch.device("cpu")) == "cpu"
    assert resolve_pipeline("auto", torch.device("cuda", 0)) == "device"
    assert resolve_pipeline("device", torch.device("cpu")) == "device"
    with pytest.raises(ConfigError, match="data.pipeline"):
        load_config("quickstart", ["data.pipeline=gpu"])
    with pytest.raises(ConfigError, match="data.device_cache_side"):
        load_config("quickstart", ["data.device_cache_side=0"])


def test_the_loop_gives_the_same_run_with_either_pipeline():
    from inflora_ray.training.learner import ContinualLearner, _DeviceLoader

    runs = {}
    for pipeline in ("cpu", "device"):
        cfg = load_config("quickstart", tiny_overrides(**{"data.num_tasks": 2, "data.pipeline": pipeline}))
        learner = ContinualLearner(cfg)
        assert learner.use_device_pipeline == (pipeline == "device")
        assert isinstance(learner._train_loader(0), _DeviceLoader) == (pipeline == "device")  # what task 0 uses
        learner.run()
        runs[pipeline] = (learner.counts.to_dict(), [r.train_loss for r in learner.task_results],
                          [r.info for r in learner.task_results])
    assert runs["cpu"] == runs["device"]
