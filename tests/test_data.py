import io
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA, need
from PIL import Image

from distributed.augment import augment, mix_transform
from distributed.config import TrainConfig
from distributed.data import DataError, Decoded, decode_data, read_images
from distributed.splits import class_weights, make_splits

FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def needs(name: str) -> Path:
    return need(DATA / name)


def split(val_fraction: float, seed: int, **more) -> TrainConfig:
    return TrainConfig(val_fraction=val_fraction, seed=seed, **more)


@pytest.fixture(scope="module")
def synthetic() -> Decoded:
    return decode_data("synthetic", seed=0)


# -- synthetic ----------------------------------------------------------------------------------------------

def test_synthetic_shapes_and_balance(synthetic):
    p = synthetic
    assert p.train_x.shape == (2100, 1, 48, 48) and p.test_x.shape == (700, 1, 48, 48)
    assert p.train_x.dtype == np.uint8 and p.train_y.dtype == np.int64 and p.test_y.dtype == np.int64
    assert p.class_names == FER_CLASSES and p.test_groups is None
    assert np.bincount(p.train_y).tolist() == [300] * 7 and np.bincount(p.test_y).tolist() == [100] * 7
    assert p.train_x.flags.c_contiguous  # Ray's object store shares contiguous arrays zero-copy
    assert p.train_x.std() > 20  # real images, not a blank canvas


def test_synthetic_is_deterministic_per_seed(synthetic):
    again, other = decode_data("synthetic", seed=0), decode_data("synthetic", seed=1)
    assert np.array_equal(again.train_x, synthetic.train_x) and np.array_equal(again.test_x, synthetic.test_x)
    assert not np.array_equal(other.train_x, synthetic.train_x)
    # test comes from its own stream: no test image repeats a training image
    assert not {x.tobytes() for x in synthetic.test_x} & {x.tobytes() for x in synthetic.train_x}


def test_synthetic_rgb_and_size():
    p = decode_data("synthetic", in_channels=3, size=64)
    assert p.train_x.shape == (2100, 3, 64, 64) and p.test_x.shape == (700, 3, 64, 64)
    assert np.array_equal(p.train_x[:, 0], p.train_x[:, 2])  # grey replicated


def test_synthetic_is_learnable_but_not_trivial(synthetic):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    s = make_splits(synthetic, split(0.2, 0))

    def features(x):  # 2x2-pooled raw pixels keep the fit to ~2 s
        return x.reshape(len(x), 24, 2, 24, 2).mean(axis=(2, 4)).reshape(len(x), -1) / 255.0

    # one BLAS thread: on a busy 2-core box, multithreaded lbfgs is 20x slower, not faster
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(max_iter=200).fit(features(s.train_x), s.train_y)
    acc = model.score(features(s.val_x), s.val_y)
    # chance is 1/7: a linear model on pixels finds the cues, but pose and lighting keep it far from perfect
    assert 0.3 < acc < 0.98, acc


# -- imagefolder ----------------------------------------------------------------------------------------------

def test_imagefolder_ckplus48():
    p = decode_data(f"imagefolder:{needs('ckplus48')}")
    assert p.train_x.shape == (777, 1, 48, 48) and p.test_x.shape == (204, 1, 48, 48)
    assert p.train_x.dtype == np.uint8 and p.train_y.dtype == np.int64
    assert p.class_names == sorted(p.class_names) and len(p.class_names) == 7 and "contempt" in p.class_names
    assert set(np.unique(p.train_y)) == set(range(7))


def test_imagefolder_rgb_and_resize():
    p = decode_data(f"imagefolder:{needs('ckplus48')}", in_channels=3, size=64)
    assert p.train_x.shape == (777, 3, 64, 64) and p.test_x.shape == (204, 3, 64, 64)


def write_image(path: Path, size=(48, 48), mode="L", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """A tiny imagefolder: 2 classes, 3 train + 1 test image each, mixed sizes and modes."""
    for i, cls in enumerate(["cat", "dog"]):
        for j in range(3):
            write_image(tmp_path / "train" / cls / f"{j}.png", seed=i * 10 + j)
        write_image(tmp_path / "test" / cls / "t.jpg", size=(100, 80), mode="RGB", seed=i)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored, not "unreadable"
    return tmp_path


def test_imagefolder_small_any_size_and_mode(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the hidden file is not counted
        p = decode_data(f"imagefolder:{folder}", size=32)
    assert p.class_names == ["cat", "dog"]
    assert p.train_x.shape == (6, 1, 32, 32) and p.test_x.shape == (2, 1, 32, 32)
    assert p.train_y.tolist() == [0, 0, 0, 1, 1, 1] and p.test_y.tolist() == [0, 1]


def test_imagefolder_skips_unreadable_files_with_a_count(folder):
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    good = (folder / "train" / "dog" / "0.png").read_bytes()
    (folder / "train" / "dog" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable files in .*train"):
        p = decode_data(f"imagefolder:{folder}")
    assert len(p.train_x) == 6 and np.bincount(p.train_y).tolist() == [3, 3]


def test_imagefolder_class_with_only_unreadable_files(folder):
    for f in (folder / "train" / "dog").iterdir():
        f.write_bytes(b"garbage")
    # the error says it all: no warning line before it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="'dog' has no readable"):
            decode_data(f"imagefolder:{folder}")


def test_imagefolder_bad_layouts(folder, tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        decode_data(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match=r"train: missing"):
        decode_data(f"imagefolder:{folder / 'train'}")  # pointed one level too deep

    (folder / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=r"bird: empty class folder"):
        decode_data(f"imagefolder:{folder}")
    (folder / "train" / "bird").rmdir()

    (folder / "test" / "fish").mkdir()
    write_image(folder / "test" / "fish" / "f.png")
    with pytest.raises(DataError, match="fish are not in train"):
        decode_data(f"imagefolder:{folder}")


def test_imagefolder_needs_two_classes(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png")
    write_image(tmp_path / "test" / "cat" / "a.png")
    with pytest.raises(DataError, match="only one class"):
        decode_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat" / "a.png").unlink()
    (tmp_path / "train" / "cat").rmdir()
    with pytest.raises(DataError, match="no class folders"):
        decode_data(f"imagefolder:{tmp_path}")


def test_read_images_for_prediction(folder, tmp_path):
    files = [folder / "train" / "cat" / "0.png", folder / "test" / "dog" / "t.jpg"]
    x = read_images([str(f) for f in files], in_channels=3, size=40)
    assert x.shape == (2, 3, 40, 40) and x.dtype == np.uint8
    pool = decode_data(f"imagefolder:{folder}", size=40)
    assert np.array_equal(read_images([str(files[0])], 1, 40)[0], pool.train_x[0])  # same decode as training
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(DataError, match="x.png: cannot read this image"):
        read_images([str(tmp_path / "x.png")])


# -- parquet --------------------------------------------------------------------------------------------------

def fer_slice(name: str, n: int = 300) -> pa.Table:
    """n rows spread over the whole file (it is sorted by usage and label, so the head is one class)."""
    table = pq.read_table(needs("fer2013") / name)
    return table.take(np.linspace(0, len(table) - 1, n).astype(int))


@pytest.fixture(scope="module")
def fer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fer")
    pq.write_table(fer_slice("train.parquet"), out / "train.parquet")
    pq.write_table(fer_slice("test.parquet"), out / "test.parquet")
    return out


def test_parquet_directory_form(fer_dir):
    p = decode_data(f"parquet:{fer_dir}")
    assert p.train_x.shape == (300, 1, 48, 48) and p.test_x.shape == (300, 1, 48, 48)
    assert p.class_names == sorted(FER_CLASSES)
    assert set(p.test_groups) == {"PublicTest", "PrivateTest"} and len(p.test_groups) == 300
    # pixels and labels are exactly the stored PNG's and the row's label
    table = pq.read_table(fer_dir / "test.parquet")
    row = 123
    expected = np.asarray(Image.open(io.BytesIO(table.column("image")[row].as_py())))
    assert np.array_equal(p.test_x[row, 0], expected)
    assert p.class_names[p.test_y[row]] == table.column("label")[row].as_py()
    assert p.test_groups[row] == table.column("usage")[row].as_py()


def test_parquet_single_file_form_splits_by_usage(fer_dir, tmp_path):
    both = pa.concat_tables([pq.read_table(fer_dir / "train.parquet"), pq.read_table(fer_dir / "test.parquet")])
    pq.write_table(both, tmp_path / "all.parquet")
    p = decode_data(f"parquet:{tmp_path / 'all.parquet'}", in_channels=3, size=64)
    assert p.train_x.shape == (300, 3, 64, 64) and p.test_x.shape == (300, 3, 64, 64)
    assert set(p.test_groups) == {"PublicTest", "PrivateTest"}

    pq.write_table(both.drop(["usage"]), tmp_path / "no_usage.parquet")
    with pytest.raises(DataError, match="no 'usage' column"):
        decode_data(f"parquet:{tmp_path / 'no_usage.parquet'}")


def test_parquet_skips_undecodable_rows(fer_dir, tmp_path):
    table = pq.read_table(fer_dir / "test.parquet")
    images = table.column("image").to_pylist()
    images[5] = images[5][:40]  # truncated PNG
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(pq.read_table(fer_dir / "train.parquet"), tmp_path / "train.parquet")
    pq.write_table(table, tmp_path / "test.parquet")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable files in .*test.parquet \(e.g. row 5:"):
        p = decode_data(f"parquet:{tmp_path}")
    assert len(p.test_x) == len(p.test_y) == len(p.test_groups) == 299


@pytest.mark.parametrize("column", ["image", "label"])
def test_parquet_missing_column(fer_dir, tmp_path, column):
    pq.write_table(pq.read_table(fer_dir / "train.parquet").drop([column]), tmp_path / "train.parquet")
    pq.write_table(pq.read_table(fer_dir / "test.parquet"), tmp_path / "test.parquet")
    with pytest.raises(DataError, match=rf"no '{column}' column \(columns: .*source_file"):
        decode_data(f"parquet:{tmp_path}")


def test_parquet_bad_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        decode_data(f"parquet:{tmp_path / 'missing.parquet'}")
    with pytest.raises(DataError, match="no train.parquet"):
        decode_data(f"parquet:{tmp_path}")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        decode_data(f"parquet:{tmp_path / 'x.parquet'}")


# -- fer2013.csv ----------------------------------------------------------------------------------------------

def write_fer_csv(path: Path, n: int = 50, short_row: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    lines = ["emotion,pixels,Usage"]
    for i in range(n):
        pixels = rng.integers(0, 256, 2303 if i == short_row else 2304)
        usage = "Training" if i < 30 else ("PublicTest" if i < 40 else "PrivateTest")
        lines.append(f"{i % 7},{' '.join(map(str, pixels))},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fer2013_csv(tmp_path):
    path = write_fer_csv(tmp_path / "fer2013.csv")
    p = decode_data(f"fer2013_csv:{path}")
    assert p.train_x.shape == (30, 1, 48, 48) and p.test_x.shape == (20, 1, 48, 48)
    assert p.class_names == FER_CLASSES
    assert p.train_y.tolist() == [i % 7 for i in range(30)]
    assert p.test_groups.tolist() == ["PublicTest"] * 10 + ["PrivateTest"] * 10
    first = np.array(path.read_text().splitlines()[1].split(",")[1].split(), dtype=np.uint8)
    assert np.array_equal(p.train_x[0, 0].ravel(), first)
    assert decode_data(f"fer2013_csv:{path}", in_channels=3, size=64).train_x.shape == (30, 3, 64, 64)


def test_long_decodes_say_how_far_they_are(tmp_path, monkeypatch, capsys):
    """On stderr, every ~10% of an image decode and every PROGRESS_FROM rows of a CSV (lowered here from 5,000)."""
    import distributed.data

    monkeypatch.setattr(distributed.data, "PROGRESS_FROM", 10)
    decode_data(f"fer2013_csv:{write_fer_csv(tmp_path / 'fer2013.csv', n=45)}")
    assert capsys.readouterr().err.splitlines() == [f"decoding {tmp_path / 'fer2013.csv'}: {n} rows"
                                                     for n in (10, 20, 30, 40)]
    root = tmp_path / "folder"
    for split, n in (("train", 12), ("test", 4)):
        for i in range(n):
            (root / split / ("happy" if i % 2 else "sad")).mkdir(parents=True, exist_ok=True)
            Image.new("L", (48, 48), i * 10).save(root / split / ("happy" if i % 2 else "sad") / f"{i}.png")
    decode_data(f"imagefolder:{root}")
    assert capsys.readouterr().err.splitlines() == [f"decoding {root}/train: 12/12 images"]  # one chunk; test < 10


def test_fer2013_csv_errors(tmp_path):
    path = write_fer_csv(tmp_path / "short.csv", short_row=7)
    with pytest.raises(DataError, match=r"row 8 \(line 9\) has 2303 pixel values, expected 2304"):
        decode_data(f"fer2013_csv:{path}")
    (tmp_path / "cols.csv").write_text("label,pixels\n0,1 2 3\n")
    with pytest.raises(DataError, match="no 'emotion' column"):
        decode_data(f"fer2013_csv:{tmp_path / 'cols.csv'}")
    with pytest.raises(DataError, match="no such file"):
        decode_data(f"fer2013_csv:{tmp_path / 'missing.csv'}")


# -- decode_data ------------------------------------------------------------------------------------------------

def test_unknown_kind_lists_the_kinds():
    with pytest.raises(DataError, match="unknown data kind 'hdf5'.*synthetic, imagefolder:PATH"):
        decode_data("hdf5:/data/x.h5")
    with pytest.raises(DataError, match="needs a path"):
        decode_data("imagefolder")


def test_errors_are_one_line(tmp_path):
    for spec in ("nope", f"imagefolder:{tmp_path / 'x'}", f"parquet:{tmp_path}", f"fer2013_csv:{tmp_path}"):
        with pytest.raises(DataError) as err:
            decode_data(spec)
        assert "\n" not in str(err.value)


# -- splits ---------------------------------------------------------------------------------------------------

def test_make_splits_stratified_disjoint_seeded(synthetic):
    s = make_splits(synthetic, split(0.2, 3))
    assert len(s.val_y) == 420 and len(s.train_y) == 1680
    assert np.bincount(s.val_y).tolist() == [60] * 7 and np.bincount(s.train_y).tolist() == [240] * 7
    train, val = {x.tobytes() for x in s.train_x}, {x.tobytes() for x in s.val_x}
    assert not train & val and len(train | val) == 2100
    assert s.test_x is synthetic.test_x and s.class_names == FER_CLASSES  # test untouched
    assert s.x is synthetic.train_x  # train and validation are indices into the shared images, never a copy

    again, other = make_splits(synthetic, split(0.2, 3)), make_splits(synthetic, split(0.2, 4))
    assert np.array_equal(again.val_x, s.val_x) and not np.array_equal(other.val_x, s.val_x)


def test_make_splits_stratified_on_imbalanced_data():
    y = np.repeat(np.arange(3), [600, 300, 100])
    pool = Decoded(np.zeros((1000, 1, 4, 4), np.uint8), y, np.zeros((3, 1, 4, 4), np.uint8), np.arange(3),
                ["a", "b", "c"])
    s = make_splits(pool, split(0.1, 0))
    assert np.bincount(s.val_y).tolist() == [60, 30, 10]
    limited = make_splits(pool, split(0.1, 0, train_limit=90))
    assert np.bincount(limited.train_y).tolist() == [54, 27, 9]
    assert np.array_equal(limited.val_y, s.val_y)  # the cap never changes the validation set


def test_make_splits_class_subset(synthetic):
    s = make_splits(synthetic, split(0.2, 0, classes=["sad", "happy"]))
    assert s.class_names == ["sad", "happy"]
    assert set(s.train_y) == set(s.val_y) == set(s.test_y) == {0, 1}
    assert len(s.train_y) + len(s.val_y) == 600 and len(s.test_y) == 200
    sad = synthetic.test_x[synthetic.test_y == FER_CLASSES.index("sad")]
    assert np.array_equal(s.test_x[s.test_y == 0], sad)  # re-indexed in the given order


def test_make_splits_keeps_test_groups_aligned():
    groups = np.array(["Pub", "Priv", "Pub", "Priv"])
    pool = Decoded(np.zeros((40, 1, 4, 4), np.uint8), np.arange(40) % 3, np.zeros((4, 1, 4, 4), np.uint8),
                np.array([0, 1, 2, 1]), ["a", "b", "c"], test_groups=groups)
    s = make_splits(pool, split(0.25, 0, classes=["b", "c"]))
    assert s.test_y.tolist() == [0, 1, 0] and s.test_groups.tolist() == ["Priv", "Pub", "Priv"]


def test_refit_trains_on_the_validation_split_too(synthetic):
    """refit (a chosen config's final model): every training image trains, the validation split among them (still
    scored, in-sample); the cap applies to the whole; nothing to hold out for cv_folds."""
    held_out, refit = make_splits(synthetic, split(0.2, 3)), make_splits(synthetic, split(0.2, 3, refit=True))
    assert np.array_equal(refit.val_idx, held_out.val_idx) and len(refit.train_idx) == 2100
    assert set(refit.train_idx.tolist()) == set(held_out.train_idx.tolist()) | set(held_out.val_idx.tolist())
    limited = make_splits(synthetic, split(0.2, 3, refit=True, train_limit=700))
    assert np.bincount(limited.train_y).tolist() == [100] * 7
    # about a fifth of the 700 are validation images (the same seed's draw would have taken none of them)
    assert 100 < len(np.intersect1d(limited.train_idx, limited.val_idx)) < 180
    with pytest.raises(DataError, match="refit trains on every training image, so cv_folds=3 has no fold"):
        make_splits(synthetic, split(0.2, 3, refit=True, cv_folds=3))


def test_make_splits_errors(synthetic):
    with pytest.raises(DataError, match="unknown class 'joy'; available: angry, disgust"):
        make_splits(synthetic, split(0.2, 0, classes=["happy", "joy"]))
    with pytest.raises(DataError, match="fewer than 2 classes"):
        make_splits(synthetic, split(0.2, 0, classes=["happy"]))
    with pytest.raises(DataError, match="twice"):
        make_splits(synthetic, split(0.2, 0, classes=["happy", "happy"]))
    with pytest.raises(DataError, match="cannot split"):
        make_splits(synthetic, split(0.2, 0, train_limit=3))  # fewer than one image per class


def test_class_weights():
    w = class_weights(np.array([0] * 60 + [1] * 30 + [2] * 10), 4)
    assert w.dtype == np.float32 and w[3] == 0
    assert np.isclose(w[:3].mean(), 1) and np.allclose(w[0] * 60, [w[1] * 30, w[2] * 10])


# -- augmentation -------------------------------------------------------------------------------------------

def test_augment_shape_device_dtype_range():
    x = torch.rand(32, 3, 48, 48)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    assert augment(x.half()).dtype == torch.float16


def test_augment_is_per_sample_and_seeded():
    x = torch.rand(1, 1, 48, 48).repeat(16, 1, 1, 1)  # the same image 16 times
    out = augment(x, torch.Generator().manual_seed(0))
    diffs = (out - out[0]).abs().flatten(1).mean(1)[1:]
    assert (diffs > 1e-3).all()  # every copy got its own transform
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_on_cuda_matches_cpu():
    x = torch.rand(8, 1, 48, 48)
    on_gpu = augment(x.cuda(), torch.Generator().manual_seed(0))
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), augment(x, torch.Generator().manual_seed(0)), atol=1e-4)


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_transform_gives_soft_labels(mixup, cutmix):
    mix = mix_transform(mixup, cutmix, num_classes=7)
    x, y = torch.rand(8, 1, 48, 48), torch.arange(8) % 7
    mixed_x, soft = mix(x, y)
    assert mixed_x.shape == x.shape and soft.shape == (8, 7)
    assert torch.allclose(soft.sum(1), torch.ones(8))


def test_mix_transform_off():
    assert mix_transform(0.0, 0.0, num_classes=7) is None
