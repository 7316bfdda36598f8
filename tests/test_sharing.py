"""Which arrays the loop shares with the decoded data and which it copies (the README says workers share images).

Shared: the training images (train.train_loop hands splits.x, the decoded train_x itself, to shared_tensor and
gathers every batch from it by index) and, unless `classes` re-indexes them, the training labels.
Copied, once per process and per fold: the validation images (Splits.val_x fancy-indexes x with val_idx, and
build_member keeps that copy as Member.val_x), with cv_folds = k together as large as the training images; with
val_from, the validation group and the rest of the test split; with classes, the labels and the test split.
"""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from distributed.config import TrainConfig
from distributed.data import Decoded
from distributed.splits import make_splits
from distributed.train import LocalRun, build_member, shared_tensor

SIDE = 16


@pytest.fixture()
def decoded() -> Decoded:
    """3 classes x 20 training images and 3 x 4 test images (half PublicTest), 1 x 16 x 16 uint8, as a loader
    returns them (C-contiguous)."""
    rng = np.random.default_rng(0)
    return Decoded(train_x=rng.integers(0, 256, (60, 1, SIDE, SIDE), dtype=np.uint8),
                   train_y=np.repeat(np.arange(3), 20),
                   test_x=rng.integers(0, 256, (12, 1, SIDE, SIDE), dtype=np.uint8),
                   test_y=np.repeat(np.arange(3), 4), class_names=["a", "b", "c"],
                   test_groups=np.array(["PublicTest", "PrivateTest"] * 6))


def loop_inputs(decoded: Decoded, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list]:
    """What train.train_loop builds before its first epoch: the images and labels every batch is gathered from,
    and one Member (model, optimizer, validation tensors) per fold."""
    folds = [make_splits(decoded, cfg, fold) for fold in range(max(1, cfg.cv_folds))]
    images, labels = shared_tensor(folds[0].x), torch.from_numpy(folds[0].y)
    return images, labels, [build_member(cfg, s, LocalRun("cpu")) for s in folds]


def test_training_images_and_labels_are_shared(decoded):
    """The tensors batches are gathered from are views of the decoded arrays; train is an index array into them."""
    cfg = TrainConfig(val_fraction=0.2)
    images, labels, (member,) = loop_inputs(decoded, cfg)
    assert np.shares_memory(images.numpy(), decoded.train_x) and images.data_ptr() == decoded.train_x.ctypes.data
    assert np.shares_memory(labels.numpy(), decoded.train_y)
    assert member.train_idx.dtype == torch.int64 and len(member.train_idx) == 48
    assert torch.equal(images[member.train_idx], torch.from_numpy(decoded.train_x[member.train_idx.numpy()]))


def test_validation_images_are_a_copy_in_every_member(decoded):
    """Splits.val_x is x[val_idx] (fancy indexing): the loop's validation tensor holds its own 12 images."""
    cfg = TrainConfig(val_fraction=0.2)
    _, _, (member,) = loop_inputs(decoded, cfg)
    val_idx = make_splits(decoded, cfg).val_idx
    assert not np.shares_memory(member.val_x.numpy(), decoded.train_x)
    assert np.array_equal(member.val_x.numpy(), decoded.train_x[val_idx])
    assert member.val_x.numpy().nbytes == 12 * SIDE * SIDE


def test_cross_validation_copies_as_many_images_as_train_holds(decoded):
    """cv_folds = 3: three members, each with its fold's validation copy; the folds partition train, so the
    copies add up to the size of the decoded training images, in every process that runs the loop."""
    _, _, members = loop_inputs(decoded, TrainConfig(cv_folds=3))
    assert len(members) == 3
    assert not any(np.shares_memory(m.val_x.numpy(), decoded.train_x) for m in members)
    assert sum(m.val_x.numpy().nbytes for m in members) == decoded.train_x.nbytes


def test_classes_subset_keeps_images_shared_but_copies_labels_and_test(decoded):
    """classes re-indexes the labels (a new array) and filters the test split (a copy); the images stay shared."""
    splits = make_splits(decoded, TrainConfig(val_fraction=0.2, classes=["c", "a"]))
    assert splits.x is decoded.train_x
    assert not np.shares_memory(splits.y, decoded.train_y)
    assert splits.y.tolist() == [1] * 20 + [-1] * 20 + [0] * 20  # class b (dropped) is -1, never indexed
    assert not np.shares_memory(splits.test_x, decoded.test_x) and len(splits.test_x) == 8


def test_val_from_copies_the_validation_group_and_the_rest_of_test(decoded):
    """val_from: validation is the test group (boolean mask: a copy) and train is all of the shared images."""
    splits = make_splits(decoded, TrainConfig(val_from="PublicTest"))
    val_x, _ = splits.val_images
    assert splits.x is decoded.train_x and len(splits.train_idx) == 60 and len(splits.val_idx) == 0
    assert not np.shares_memory(val_x, decoded.test_x) and len(val_x) == 6
    assert not np.shares_memory(splits.test_x, decoded.test_x) and len(splits.test_x) == 6


def test_train_x_property_is_a_copy(decoded):
    """Splits.train_x exists for inspection and copies; the loop never calls it."""
    splits = make_splits(decoded, TrainConfig(val_fraction=0.2))
    assert not np.shares_memory(splits.train_x, decoded.train_x)


def test_decoded_pickles_out_of_band_and_a_read_only_array_stays_shared(decoded):
    """Ray's object store maps what pickle protocol 5 passes out of band (numpy's buffers), and gives back
    read-only arrays: train_x goes out of band, comes back as a view of that buffer, and shared_tensor wraps the
    read-only view without a copy and without torch's "not writable" warning."""
    buffers = []
    blob = pickle.dumps(decoded, protocol=5, buffer_callback=buffers.append)
    assert len(blob) < decoded.train_x.nbytes  # the images are not in the pickle stream
    store = [bytes(b.raw()) for b in buffers]  # stands for the object store's (read-only) memory
    back = pickle.loads(blob, buffers=store)
    (train_buffer,) = [b for b in store if len(b) == decoded.train_x.nbytes]
    assert np.shares_memory(back.train_x, np.frombuffer(train_buffer, np.uint8))
    assert not back.train_x.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = shared_tensor(back.train_x)
    assert np.shares_memory(images.numpy(), back.train_x)


def test_a_loaders_images_pickle_out_of_band():
    """numpy passes only a contiguous array out of band (anything else is copied into the pickle stream, and so
    into every worker): the synthetic loader's training images go out of band."""
    from distributed.data import decode_data

    train_x = decode_data("synthetic", seed=0).train_x
    buffers = []
    blob = pickle.dumps(train_x, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and len(blob) < 1000 and buffers[0].raw().nbytes == train_x.nbytes
