"""The data layer: every source loads, every bad file gets its message, batches mix at the asked fraction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustbench_conn.data import (ArrayDataset, DataError, MixedBatchSampler, check_num_classes, get_dataset,
                                   load_npz)


def _write_npz(path: Path, n=20, hw=32, c=3, classes=10, **override):
    rng = np.random.default_rng(0)
    arrays = {"image": rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8),
              "label": rng.integers(0, classes, n).astype(np.int64)}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_digits_is_embedded_and_cifar_shaped():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train.num_classes == 10
    x, y = train.batch(range(8))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and set(test.labels.tolist()) == set(range(10))


def test_shared_cifar10_npz_loads(cifar10_dir):
    test = get_dataset("npz", "test", str(cifar10_dir))
    assert len(test) == 10_000 and test.num_classes == 10
    x, y = test.batch([0, 1])
    assert x.shape == (2, 3, 32, 32)
    item_x, item_y = test[1]
    assert torch.equal(item_x, x[1]) and item_y == int(y[1])


def test_several_npz_files_concatenate(tmp_path):
    _write_npz(tmp_path / "train_0.npz", n=5)
    _write_npz(tmp_path / "train_1.npz", n=7)
    _write_npz(tmp_path / "test.npz", n=3)
    assert len(get_dataset("npz", "train", str(tmp_path))) == 12
    assert len(get_dataset("npz", "test", str(tmp_path))) == 3
    both = f"{tmp_path / 'train_0.npz'},{tmp_path / 'test.npz'}"
    assert len(get_dataset("npz", "train", both)) == 8


def test_grayscale_npz_becomes_rgb(tmp_path):
    ds = load_npz(_write_npz(tmp_path / "g.npz", c=1))
    assert ds.batch([0])[0].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("override,message", [
    ({"image": np.zeros((4, 32, 32, 3), np.float32)}, "dtype float32; expected uint8"),
    ({"image": np.zeros((4, 3, 32, 32), np.uint8)}, "expected N x H x W x C"),
    ({"label": np.array([0, 1, 2, 11] * 5)}, "labels span 0..11, outside 0..9"),
    ({"label": np.array([0.0] * 20)}, "expected integer class indices"),
    ({"label": np.zeros(3, np.int64)}, "for 20 images"),
])
def test_bad_npz_arrays_are_refused_by_name(tmp_path, override, message):
    path = _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=message) as err:
        load_npz(path, num_classes=10)
    assert str(path) in str(err.value)


def test_bad_npz_files_are_named(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    html = tmp_path / "page.npz"
    html.write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    good = _write_npz(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    np.savez(tmp_path / "keys.npz", x=np.zeros(3), y=np.zeros(3))
    np.savez(tmp_path / "none.npz", image=np.zeros((0, 32, 32, 3), np.uint8), label=np.zeros(0, np.int64))
    cases = {empty: "is empty", html: "HTML page", truncated: "truncated", tmp_path / "keys.npz": "expected 'image'",
             tmp_path / "none.npz": "holds no images", tmp_path / "missing.npz": "does not exist"}
    for path, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_npz(path)


def test_class_count_must_match_the_model():
    ds = get_dataset("digits", "test")
    check_num_classes(ds, 10)
    with pytest.raises(DataError, match="has 10 classes but the model has 100 outputs"):
        check_num_classes(ds, 100)


def test_torchvision_offline_gives_one_clear_sentence(tmp_path):
    with pytest.raises(DataError) as err:
        get_dataset("cifar10", "train", str(tmp_path), download=False)
    message = str(err.value)
    assert "CIFAR-10 was not found under" in message and "--data-dir" in message and "\n" not in message


def test_torchvision_cifar_files_load(tmp_path, monkeypatch):
    """A CIFAR-10 folder in torchvision's layout (written here, no download) loads through the cifar10 source."""
    import hashlib
    import pickle

    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cls = torchvision.datasets.CIFAR10
    for name, _ in cls.train_list + cls.test_list:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    # torchvision checks md5 sums of the files; point its table at ours
    md5 = lambda name: hashlib.md5((folder / name).read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5("batches.meta")))
    ds = get_dataset("cifar10", "test", str(tmp_path), download=False)
    assert len(ds) == 4 and ds.num_classes == 10 and ds.batch([0])[0].shape == (1, 3, 32, 32)


def test_imagefolder_loads(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    ds = get_dataset("imagefolder", "train", str(tmp_path), image_size=32)
    assert len(ds) == 4 and ds.num_classes == 2 and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="does not exist"):
        get_dataset("imagefolder", "train", str(tmp_path / "nope"))


def test_unknown_dataset_is_refused():
    with pytest.raises(DataError, match="use one of cifar10"):
        get_dataset("cifar-10")


def test_mixed_batches_hold_the_unsup_fraction():
    sampler = MixedBatchSampler(num_labeled=100, batch_size=20, num_aux=300, unsup_fraction=0.7, seed=1)
    batches = list(sampler)
    assert len(batches) == 5
    for batch in batches:
        assert len(batch) == 20 and sum(i >= 100 for i in batch) == 14
    labeled = [i for b in batches for i in b if i < 100]
    assert len(set(labeled)) == len(labeled) == 30  # no labeled example repeats within an epoch


def test_batches_depend_only_on_seed_and_epoch():
    a = MixedBatchSampler(50, 10, num_aux=40, unsup_fraction=0.5, seed=3)
    b = MixedBatchSampler(50, 10, num_aux=40, unsup_fraction=0.5, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_ranks_split_each_global_batch():
    single = list(MixedBatchSampler(64, 16, num_aux=64, unsup_fraction=0.5, seed=0))
    ranks = [list(MixedBatchSampler(64, 16, num_aux=64, unsup_fraction=0.5, seed=0, rank=r, world_size=2))
             for r in range(2)]
    for whole, part0, part1 in zip(single, *ranks):
        assert sorted(part0 + part1) == sorted(whole) and len(part0) == len(part1) == 8
        assert sum(i >= 64 for i in part0) == sum(i >= 64 for i in part1) == 4


def test_sampler_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="lower --batch-size"):
        MixedBatchSampler(num_labeled=10, batch_size=32)


def test_array_dataset_concat_refuses_mixed_shapes():
    a = ArrayDataset(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 10, "a")
    b = ArrayDataset(torch.zeros(2, 28, 28, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 10, "b")
    with pytest.raises(DataError, match="cannot mix"):
        ArrayDataset.concat([a, b])
