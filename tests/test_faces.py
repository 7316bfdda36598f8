"""Configs that hold up on new faces: person-grouped validation and cross-validation, the FER2013 protocol
(select on PublicTest, report PrivateTest), test-time augmentation, ensembles, and rungs after the warm-up."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, SPACES, need
from PIL import Image

from distributed.cli import main
from distributed.config import TrainConfig
from distributed.data import DataError, Decoded, decode_data, load_data
from distributed.ensemble import ENSEMBLE_FORMAT, Ensemble, load_predictor
from distributed.evaluate import predict, tta_views
from distributed.modelfile import model_blob
from distributed.models import create_model
from distributed.search_space import load_space
from distributed.splits import make_splits
from distributed.train import LocalRun, train_loop

# -- group-aware validation on CK+48 (person split) ----------------------------------------------------------


@pytest.fixture(scope="module")
def ckplus():
    root = need(DATA / "ckplus48")
    with open(root / "manifest.csv", newline="") as f:
        subject = {row["path"]: row["subject"] for row in csv.DictReader(f)}
    cfg = TrainConfig(data=f"imagefolder:{root}", group_by="subject")
    return cfg, load_data(cfg), subject


def people(decoded: Decoded, idx: np.ndarray, subject: dict) -> set[str]:
    return {subject[decoded.train_names[i]] for i in idx}


def test_group_split_never_puts_one_person_on_both_sides(ckplus):
    cfg, decoded, subject = ckplus
    s = make_splits(decoded, cfg)
    assert len(s.train_idx) + len(s.val_idx) == 777
    assert not people(decoded, s.train_idx, subject) & people(decoded, s.val_idx, subject)
    # about one group in round(1 / 0.15) = 7 is held out; stratification keeps most classes on both sides
    assert 0.07 < len(s.val_idx) / 777 < 0.3 and len(set(s.val_y)) >= 5
    # a plain split (no groups) does put people on both sides: that is what group_by is for
    plain = make_splits(decoded, cfg.replace(group_by=""))
    assert people(decoded, plain.train_idx, subject) & people(decoded, plain.val_idx, subject)
    # the regex form finds the same people in the file names (S005_001_00000009.png)
    by_name = load_data(cfg.replace(group_by=r"re:^(S\d+)_"))
    assert by_name.train_groups.tolist() == decoded.train_groups.tolist()


def test_cross_validation_folds_partition_train_by_person(ckplus):
    cfg, decoded, subject = ckplus
    cfg = cfg.replace(cv_folds=5)
    folds = [make_splits(decoded, cfg, fold) for fold in range(5)]
    held_out = np.concatenate([s.val_idx for s in folds])
    assert sorted(held_out.tolist()) == list(range(777))  # every image is validated exactly once
    for s in folds:
        assert not people(decoded, s.train_idx, subject) & people(decoded, s.val_idx, subject)
    assert [s.val_idx.tolist() for s in folds] == [make_splits(decoded, cfg, k).val_idx.tolist() for k in range(5)]


def test_cross_validated_loop_reports_the_fold_mean_over_all_images(tmp_path):
    # 3 folds on synthetic faces: every epoch each fold's model trains once; the report covers all 3 folds
    from distributed.modelfile import fold_states, load_state

    cfg = TrainConfig(model="small_cnn", data="synthetic", cv_folds=3, epochs=2, train_limit=200, seed=0)
    decoded = decode_data("synthetic")
    run = LocalRun("cpu", checkpoint_dir=tmp_path)
    train_loop(cfg, decoded, run)
    assert [r["epoch"] for r in run.reports] == [1, 2]
    assert all(r["val_count"] == len(decoded.train_y) for r in run.reports)
    # the reported val_acc is the mean of each fold's model scored on its own held-out fold (the last epoch's
    # weights are in the checkpoint, one model_state per fold)
    state, _ = load_state(tmp_path)
    accs = []
    for fold, saved in enumerate(fold_states(state)):
        split = make_splits(decoded, cfg, fold)
        net = create_model("small_cnn", len(split.class_names))
        net.load_state_dict(saved["model"])
        pred = predict(net.eval(), torch.from_numpy(split.val_x), cfg, torch.device("cpu")).argmax(1).numpy()
        accs.append(float((pred == split.val_y).mean()))
    assert len(set(accs)) > 1  # three different models
    assert run.reports[-1]["val_acc"] == pytest.approx(np.mean(accs), abs=1e-9)


# -- FER2013 protocol ----------------------------------------------------------------------------------------

def fer_like() -> Decoded:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (60, 1, 48, 48), dtype=np.uint8)
    y = np.tile(np.arange(3), 20)
    usage = np.array(["PublicTest"] * 12 + ["PrivateTest"] * 18)
    return Decoded(x[:30], y[:30], x[30:], y[30:], ["a", "b", "c"], test_groups=usage)


def test_val_from_publictest_validates_there_and_reports_privatetest():
    decoded = fer_like()
    s = make_splits(decoded, TrainConfig(val_from="PublicTest"))
    assert len(s.train_idx) == 30 and len(s.val_idx) == 0  # all of Training trains
    assert np.array_equal(s.val_x, decoded.test_x[:12]) and np.array_equal(s.val_y, decoded.test_y[:12])
    assert np.array_equal(s.test_x, decoded.test_x[12:]) and set(s.test_groups) == {"PrivateTest"}
    with pytest.raises(DataError, match="val_from='Public'"):
        make_splits(decoded, TrainConfig(val_from="Public"))
    # refit changes nothing here: PublicTest is a test group, never trained on
    refit = make_splits(decoded, TrainConfig(val_from="PublicTest", refit=True))
    assert np.array_equal(refit.train_idx, s.train_idx) and np.array_equal(refit.val_x, s.val_x)


# -- test-time augmentation ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = TrainConfig(model="small_cnn")
    net = create_model("small_cnn", 3, in_channels=1, dropout=0.0).eval()
    return net, cfg


def test_flip_and_tencrop_on_symmetric_and_constant_faces(tiny):
    """What holds exactly: on a mirror-symmetric image the mirror is the image itself, so flip equals the plain
    output, and ten-crop (five crops of the image, then the same five of its mirror) equals the mean over its
    first five views. On a constant image every crop, resized back, is the same constant image, so ten-crop equals
    the plain output too. On a random image ten-crop gives a different answer."""
    net, cfg = tiny
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (4, 1, 48, 24), dtype=np.uint8)
    sym = torch.from_numpy(np.concatenate([half, half[..., ::-1]], axis=-1).copy())
    plain = predict(net, sym, cfg, torch.device("cpu")).softmax(1)
    flip = predict(net, sym, cfg, torch.device("cpu"), tta="flip").softmax(1)
    assert torch.allclose(flip, plain, atol=1e-5)

    from distributed.evaluate import prepare_batch

    views = tta_views(prepare_batch(sym, cfg, torch.device("cpu")), "tencrop")
    assert len(views) == 10 and all(v.shape == (4, 1, 48, 48) for v in views)
    with torch.no_grad():
        five = torch.stack([net(v).softmax(1) for v in views[:5]]).mean(0)
    ten = predict(net, sym, cfg, torch.device("cpu"), tta="tencrop").softmax(1)
    assert torch.allclose(ten, five, atol=1e-5)

    const = torch.full((2, 1, 48, 48), 90, dtype=torch.uint8)
    assert torch.allclose(predict(net, const, cfg, torch.device("cpu"), tta="tencrop").softmax(1),
                          predict(net, const, cfg, torch.device("cpu")).softmax(1), atol=1e-5)
    noise = torch.from_numpy(rng.integers(0, 255, (4, 1, 48, 48), dtype=np.uint8))
    assert not torch.allclose(predict(net, noise, cfg, torch.device("cpu"), tta="tencrop"),
                              predict(net, noise, cfg, torch.device("cpu")).log_softmax(1), atol=1e-4)


# -- ensembles -----------------------------------------------------------------------------------------------

def test_ensemble_of_copies_equals_the_model_and_its_file_loads_safely(tiny, tmp_path, capsys):
    net, cfg = tiny
    blob = model_blob(net, cfg.replace(tta="flip"), ["angry", "happy", "sad"], {"val_acc": 0.5})
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (5, 1, 48, 48), dtype=np.uint8))
    one, three = Ensemble([blob]), Ensemble([blob] * 3)
    assert torch.allclose(three.probs(x), one.probs(x), atol=1e-6)
    assert torch.allclose(one.probs(x, "none"), predict(net, x, cfg, torch.device("cpu")).softmax(1), atol=1e-6)

    three.save(tmp_path / "ensemble_model.pt")
    raw = torch.load(tmp_path / "ensemble_model.pt", weights_only=True)
    assert raw["format"] == ENSEMBLE_FORMAT and len(raw["members"]) == 3
    loaded = load_predictor(tmp_path / "ensemble_model.pt")
    assert torch.allclose(loaded.probs(x), one.probs(x), atol=1e-6)

    face = tmp_path / "face.png"
    Image.fromarray(x[0, 0].numpy(), "L").save(face)
    assert main(["predict", str(tmp_path / "ensemble_model.pt"), str(face), "--tta", "tencrop"]) == 0
    assert capsys.readouterr().out.startswith(f"{face} face 0 at x=0 y=0 w=48 h=48: ")  # a crop: one face


# -- rungs after the warm-up ---------------------------------------------------------------------------------

def test_grace_period_inside_the_warmup_warns(tmp_path):
    doc = yaml.safe_load((SPACES / "quick.yaml").read_text())
    assert load_space(SPACES / "quick.yaml").warnings() == []
    doc["scheduler"]["asha"]["grace_period"] = 1  # OneCycle's warm-up: 0.25 x 6 = 1.5 epochs
    doc["space"]["schedule"] = {"choice": ["onecycle", "wsd", "constant"]}  # (quick itself searches wsd, constant)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    (warning,) = load_space(tmp_path / "s.yaml").warnings()
    assert "grace_period (1) ends inside the OneCycle warm-up" in warning and "1.5 epochs" in warning


# -- a search's top trials as one model (real Ray, real search) ----------------------------------------------

@pytest.mark.slow
def test_ensemble_of_a_real_search(two_arch_search, tmp_path, capsys):
    import shutil

    exp = tmp_path / "ens"
    shutil.copytree(two_arch_search, exp)  # conftest's search of two trials (small_cnn, emotion_cnn48)
    assert main(["ensemble", str(exp), "--top", "3"]) == 2
    assert "--top 3: only 2 trials" in capsys.readouterr().err
    assert main(["ensemble", str(exp), "--top", "2", "--tta", "flip"]) == 0
    out = exp / "ensemble_top2"
    summary = yaml.safe_load((out / "ensemble.json").read_text())
    assert len(summary["members"]) == 2 and summary["tta"] == "flip"
    for where in (out, out / "single_best"):
        assert (where / "classification_report.txt").exists() and (where / "confusion_matrix.png").exists()
    face = tmp_path / "face.png"
    Image.fromarray(np.full((48, 48), 120, np.uint8), "L").save(face)
    assert main(["predict", str(out / "ensemble_model.pt"), str(face)]) == 0
    # --retrain: the best config trained again to its budget by `emotune train`, then scored the same way
    assert main(["ensemble", str(exp), "--top", "1", "--retrain"]) == 0
    best = yaml.safe_load((exp / "ensemble_top1_retrained" / "ensemble.json").read_text())
    assert best["retrained"] and (exp / "ensemble_top1_retrained" / "retrain" / best["members"][0]["trial_id"] /
                                  "best_model.pt").exists()
    assert best["ensemble"] == best["single_best"]  # an ensemble of one is its member
