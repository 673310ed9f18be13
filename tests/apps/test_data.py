"""torch_qode.data: CIFAR-100 through torchvision's real loader on a CIFAR-100-format fixture,
the missing-dataset message, scikit-learn digits, seeded loaders. Nothing is downloaded."""
import hashlib
import json
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR100

from torch_qode.data import (CIFAR100_MEAN, CIFAR100_STD, FIXTURE_MARKER, DatasetNotFoundError, cifar100,
                             digits, digits_split_sizes, digits_tensors, loader, loaders, write_cifar100_fixture)
from torch_qode.data.digits import _split_indices
from torch_qode.data.fixtures import CIFAR100_FINE_TO_COARSE

N_TRAIN, N_TEST = 150, 30


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100_fixture(root, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return root


def raw(root, name, encoding="bytes"):
    with open(root / "cifar-100-python" / name, "rb") as f:
        return pickle.load(f, encoding=encoding)


def normalised(img_hwc_uint8):
    """Independent normalisation: uint8 HWC -> float CHW, (x/255 - mean)/std per channel."""
    x = torch.as_tensor(np.asarray(img_hwc_uint8), dtype=torch.float32).permute(2, 0, 1) / 255
    return (x - torch.tensor(CIFAR100_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR100_STD).view(3, 1, 1)


# -------------------------------------------------------------------------- the on-disk format
def test_fixture_files_have_cifar100_keys_and_layout(root):
    for name, n, label in (("train", N_TRAIN, b"training batch 1 of 1"), ("test", N_TEST, b"testing batch 1 of 1")):
        entry = raw(root, name)  # the official files read this way give bytes keys
        assert set(entry) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (n, 3072)
        assert entry[b"batch_label"] == label
        assert len(entry[b"filenames"]) == n and all(isinstance(f, bytes) for f in entry[b"filenames"])
        fine, coarse = np.array(entry[b"fine_labels"]), np.array(entry[b"coarse_labels"])
        assert fine.min() >= 0 and fine.max() <= 99 and coarse.max() <= 19
        np.testing.assert_array_equal(coarse, np.array(CIFAR100_FINE_TO_COARSE)[fine])
    assert set(raw(root, "train", "latin1")) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    meta = raw(root, "meta")
    assert set(meta) == {b"fine_label_names", b"coarse_label_names"}
    fine_names = [n.decode() for n in meta[b"fine_label_names"]]
    assert len(fine_names) == len(set(fine_names)) == 100 and fine_names == sorted(fine_names)
    assert len(meta[b"coarse_label_names"]) == 20
    # a few fixed points of the real CIFAR-100 label tables
    assert fine_names[0] == "apple" and fine_names[99] == "worm" and fine_names[55] == "otter"
    coarse_names = [n.decode() for n in meta[b"coarse_label_names"]]
    assert coarse_names[CIFAR100_FINE_TO_COARSE[fine_names.index("otter")]] == "aquatic_mammals"
    assert coarse_names[CIFAR100_FINE_TO_COARSE[fine_names.index("tractor")]] == "vehicles_2"


def test_fixture_is_deterministic_and_covers_all_classes(tmp_path):
    a = write_cifar100_fixture(tmp_path / "a", n_train=200, n_test=10, seed=3)
    b = write_cifar100_fixture(tmp_path / "b", n_train=200, n_test=10, seed=3)
    c = write_cifar100_fixture(tmp_path / "c", n_train=200, n_test=10, seed=4)
    for name in ("train", "test", "meta"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train").read_bytes() != (c / "train").read_bytes()
    assert sorted(raw(tmp_path / "a", "train")[b"fine_labels"]) == sorted(list(range(100)) * 2)
    marker = json.loads((a / FIXTURE_MARKER).read_text())
    assert marker["fixture"] is True
    assert marker["md5"]["train"] == hashlib.md5((a / "train").read_bytes()).hexdigest()


@pytest.mark.parametrize("kwargs", [dict(n_train=0), dict(n_test=-1), dict(seed=-1), dict(n_train=2.5)])
def test_fixture_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        write_cifar100_fixture(tmp_path, **kwargs)


# ------------------------------------------------------------ torchvision's real loader on the fixture
def test_plain_torchvision_refuses_fixture_md5(root):
    """The md5 check is real: unmodified CIFAR100 with the official md5s rejects the fixture."""
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(root, train=True, download=False)


def test_plain_torchvision_loads_fixture_with_its_md5(root, monkeypatch):
    """With only the md5 table swapped, torchvision's own CIFAR100 class reads the fixture."""
    md5 = json.loads((root / "cifar-100-python" / FIXTURE_MARKER).read_text())["md5"]
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    ds = CIFAR100(root, train=False, download=False)
    assert len(ds) == N_TEST and len(ds.classes) == 100


@pytest.mark.parametrize("train,n", [(True, N_TRAIN), (False, N_TEST)])
def test_cifar100_on_fixture_shapes_labels(root, train, n):
    ds = cifar100(root, train=train)
    assert isinstance(ds, CIFAR100) and ds.is_fixture and "Fixture" in repr(ds)
    entry = raw(root, "train" if train else "test")
    assert len(ds) == n
    assert list(ds.targets) == entry[b"fine_labels"]
    assert ds.classes == [c.decode() for c in raw(root, "meta")[b"fine_label_names"]]
    # torchvision decoded the channel-planar rows into HWC images
    np.testing.assert_array_equal(ds.data[7], entry[b"data"][7].reshape(3, 32, 32).transpose(1, 2, 0))
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == entry[b"fine_labels"][7]


def test_cifar100_test_split_normalised_not_augmented(root):
    ds = cifar100(root, train=False)
    names = [type(t).__name__ for t in ds.transform.transforms]
    assert names == ["ToTensor", "Normalize"]
    for i in (0, 5, 29):
        torch.testing.assert_close(ds[i][0], normalised(ds.data[i]))
        torch.testing.assert_close(ds[i][0], ds[i][0])  # deterministic
    # every value lies between the images of pixel 0 and pixel 255
    lo = (0 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR100_STD)
    hi = (1 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR100_STD)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert (x.amin(dim=(0, 2, 3)) >= lo - 1e-6).all() and (x.amax(dim=(0, 2, 3)) <= hi + 1e-6).all()


def _is_crop_flip_of(x, clean):
    """Is x a 32×32 crop (offset in [-4, 4], zero padding) of clean, possibly flipped horizontally?"""
    pad_value = normalised(np.zeros((1, 1, 3), dtype=np.uint8))  # a padded zero pixel, normalised
    padded = pad_value.expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = clean
    for flip in (False, True):
        src = padded.flip(-1) if flip else padded
        for dy in range(9):
            for dx in range(9):
                if torch.allclose(src[:, dy:dy + 32, dx:dx + 32], x, atol=1e-6):
                    return True
    return False


def test_cifar100_train_split_augmented(root):
    ds = cifar100(root, train=True)
    names = [type(t).__name__ for t in ds.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert ds.transform.transforms[0].padding == 4
    torch.manual_seed(0)
    draws = [ds[3][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random
    clean = normalised(ds.data[3])
    assert all(_is_crop_flip_of(d, clean) for d in draws)
    assert not _is_crop_flip_of(normalised(ds.data[4]), clean)  # the check can fail
    plain = cifar100(root, train=True, augment=False)
    torch.testing.assert_close(plain[3][0], clean)


def test_tampered_fixture_is_refused(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with open(copy / "cifar-100-python" / "train", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        cifar100(copy, train=True)


@pytest.mark.parametrize("payload", [b"garbage, not a pickle", "truncated"])
def test_fixture_with_matching_md5_but_broken_pickle_is_refused(root, tmp_path, payload):
    """A marker whose md5 was updated for broken files: the md5 check passes, unpickling fails."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    folder = copy / "cifar-100-python"
    data = (folder / "train").read_bytes()[:5000] if payload == "truncated" else payload
    (folder / "train").write_bytes(data)
    marker = json.loads((folder / FIXTURE_MARKER).read_text())
    marker["md5"]["train"] = hashlib.md5(data).hexdigest()
    (folder / FIXTURE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(DatasetNotFoundError, match=r"corrupted \(UnpicklingError.*write_cifar100_fixture"):
        cifar100(copy, train=True)


# ------------------------------------------------------------------------- missing dataset
def test_missing_dataset_names_both_remedies(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        cifar100(tmp_path / "nowhere", train=True)
    msg = str(info.value)
    assert "--data-root" in msg and "--download" in msg and "cifar-100-python" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_unmarked_copy_checked_against_official_md5(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "cifar-100-python" / FIXTURE_MARKER).unlink()
    with pytest.raises(DatasetNotFoundError, match="integrity") as info:
        cifar100(copy, train=False)
    assert "--data-root" in str(info.value) and "--download" in str(info.value)


def test_failed_download_names_both_remedies(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(CIFAR100, "download", no_network)  # nothing is fetched in the tests
    with pytest.raises(DatasetNotFoundError, match="download") as info:
        cifar100(tmp_path, train=True, download=True)
    assert "--data-root" in str(info.value)


def test_cifar100_bad_arguments(root):
    with pytest.raises(TypeError, match="train"):
        cifar100(root, train="yes")
    with pytest.raises(TypeError, match="augment"):
        cifar100(root, augment=1)


# ----------------------------------------------------------------------------------------- digits
def test_digits_split_sizes_and_ranges():
    X, y = digits_tensors("train")
    Xt, yt = digits_tensors("test")
    assert X.shape == (len(y), 1, 8, 8) and Xt.shape == (len(yt), 1, 8, 8)
    assert len(y) + len(yt) == 1797
    assert abs(len(yt) / 1797 - 0.2) < 0.01
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    # stratified: every class keeps ~20 % in the test split
    for c in range(10):
        frac = (yt == c).sum().item() / ((y == c).sum().item() + (yt == c).sum().item())
        assert abs(frac - 0.2) < 0.02
    # standardised with train statistics
    assert abs(X.mean().item()) < 1e-5 and abs(X.std().item() - 1) < 1e-3
    assert abs(Xt.mean().item()) < 0.1


@pytest.mark.parametrize("fraction, empty", [(0.001, "test"), (0.999, "training")])
def test_digits_split_leaving_a_side_empty_is_refused(fraction, empty):
    for call in (lambda: digits_tensors("train", fraction), lambda: digits("test", fraction),
                 lambda: digits_split_sizes(fraction)):
        with pytest.raises(ValueError, match=rf"test_fraction={fraction} leaves the {empty} split empty"):
            call()
    n_train, n_test = digits_split_sizes(0.2)
    assert (n_train, n_test) == (len(digits("train")), len(digits("test"))) and n_train + n_test == 1797
    assert digits_split_sizes(0.006)[1] == 10           # one test image per class still works


def test_digits_content_matches_sklearn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X, y = digits_tensors("all", image=False, dtype=torch.float64)
    assert X.shape == (1797, 64)
    np.testing.assert_array_equal(y.numpy(), bunch.target)
    # undo the affine normalisation: a per-dataset scale and shift of pixels/16
    a, b = np.polyfit(X[:, 10].numpy(), bunch.data[:, 10] / 16, 1)
    np.testing.assert_allclose(a * X.numpy() + b, bunch.data / 16, atol=1e-9)


def test_digits_split_is_deterministic_disjoint_and_complete():
    a, b = digits_tensors("train", seed=5), digits_tensors("train", seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = digits_tensors("train", seed=6)
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])
    labels = np.repeat(np.arange(10), 30)
    train, test = _split_indices(labels, 0.25, seed=1)
    assert set(train).isdisjoint(test) and sorted(np.concatenate([train, test])) == list(range(300))
    assert all((labels[test] == k).sum() == 8 for k in range(10))  # round(0.25 · 30)


def test_digits_dataset_items():
    ds = digits("test", test_fraction=0.3, seed=2)
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and 0 <= int(y) <= 9
    assert len(ds) == len(digits_tensors("test", test_fraction=0.3, seed=2)[1])
    assert digits("train", image=False)[0][0].shape == (64,)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(split="val"), ValueError), (dict(test_fraction=0.0), ValueError), (dict(test_fraction=1.0), ValueError),
    (dict(seed=-1), ValueError), (dict(image="yes"), TypeError),
])
def test_digits_bad_arguments(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        digits_tensors(**kwargs)


# ---------------------------------------------------------------------------------------- loaders
def test_loaders_seeded_shuffle():
    ds = torch.utils.data.TensorDataset(torch.arange(100))

    def order(seed):
        return torch.cat([b[0] for b in loaders(ds, batch_size=16, seed=seed)[0]]).tolist()

    torch.manual_seed(123)
    first = order(0)
    torch.manual_seed(456)  # the global RNG does not matter
    assert order(0) == first and order(1) != first and sorted(first) == list(range(100))
    train, test = loaders(ds, ds, batch_size=16, test_batch_size=50, drop_last=True)
    assert [len(b[0]) for b in train] == [16] * 6
    assert torch.cat([b[0] for b in test]).tolist() == list(range(100)) and len(test) == 2
    assert loaders(ds)[1] is None
    assert torch.cat([b[0] for b in loader(ds, batch_size=30)]).tolist() == list(range(100))


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(num_workers=-1), dict(batch_size=2.0)])
def test_loader_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        loader(torch.utils.data.TensorDataset(torch.arange(4)), **kwargs)
