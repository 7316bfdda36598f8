"""`emotune predict` on composed photos (real CK+48 faces pasted at known places) and `emotune export` checked
against PyTorch with onnxruntime. The model is a real one, trained for one short epoch by the loop itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATA, need
from PIL import Image

from distributed.cli import main
from distributed.config import TrainConfig
from distributed.modelfile import BEST_FILE, load_model
from distributed.train import LocalRun, train_loop

FACE_PX = 144  # CK+48 crops upscaled so the Haar cascade (trained on ~24 px and up, with context) finds them


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    cfg = TrainConfig(model="small_cnn", data="synthetic", epochs=1, train_limit=200, batch_size=32)
    train_loop(cfg, None, LocalRun(device="cpu", checkpoint_dir=out))
    return out / BEST_FILE


def ck_faces(n: int) -> list[Image.Image]:
    files = sorted(need(DATA / "ckplus48" / "test").glob("*/*.png"))[::37][:n]
    return [Image.open(f).convert("RGB").resize((FACE_PX, FACE_PX), Image.BICUBIC) for f in files]


def background(h: int, w: int) -> np.ndarray:
    """A smooth gradient: a plain wall, nothing face-like."""
    ramp = np.linspace(60, 210, w, dtype=np.float32)[None, :] * np.linspace(0.8, 1.0, h, dtype=np.float32)[:, None]
    return np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8)


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


def test_faces_in_a_photo_are_found_classified_and_drawn(model_file, tmp_path, capsys):
    photo = background(420, 900)
    pasted = [(60, 80), (380, 220), (680, 40)]  # x, y of each face's top-left corner
    for face, (x, y) in zip(ck_faces(3), pasted):
        photo[y:y + FACE_PX, x:x + FACE_PX] = np.asarray(face)
    Image.fromarray(photo).save(tmp_path / "group.jpg", quality=95)

    assert main(["predict", str(model_file), str(tmp_path / "group.jpg"), "--json",
                 "--annotate", str(tmp_path / "drawn.png")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3, records
    _, _, names, _ = load_model(model_file)
    for (x, y), rec in zip(pasted, records):  # records come left to right, as the faces were pasted
        assert iou(rec["box"], (x, y, FACE_PX, FACE_PX)) > 0.5, (rec["box"], (x, y))
        assert rec["class"] in names and 0 < rec["confidence"] <= 1 and len(rec["top3"]) == 3

    drawn = np.asarray(Image.open(tmp_path / "drawn.png").convert("RGB"))
    assert drawn.shape == photo.shape
    x, y, _, h = records[0]["box"]
    edge = drawn[y + h // 2, x - 1:x + 2].astype(int)  # the box's left edge is drawn in green
    assert (edge[:, 1] - edge[:, 0] > 100).any(), edge


def test_face_crops_photos_without_faces_and_folders(model_file, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    crop = Image.open(min(need(DATA / "ckplus48" / "test" / "happy").glob("*.png")))  # 48x48: a crop already
    crop.save(folder / "a_crop.png")
    Image.fromarray(background(300, 400)).save(folder / "b_wall.png")
    assert main(["predict", str(model_file), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert "a_crop.png face 0 at x=0 y=0 w=48 h=48:" in lines[0]
    assert lines[1].endswith("b_wall.png: no face found")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_any_batch_size(model_file, tmp_path, fmt, capsys):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(model_file), "--format", fmt, "--output", str(out)]) == 0
    meta = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    net, cfg, names, _ = load_model(model_file)
    assert meta["class_names"] == names and meta["input"]["shape"][1:] == [cfg.in_channels, 48, 48]
    assert meta["input"]["mean"] == [0.449] and meta["input"]["std"] == [0.226]
    x = torch.randn(5, cfg.in_channels, 48, 48)  # the export traced a batch of 2: 5 shows the batch is dynamic
    with torch.no_grad():
        want = net(x).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
    else:
        got = torch.jit.load(str(out)).eval()(x).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_an_rgb_model_classifies_each_face_as_its_training_images_were_decoded(tmp_path, capsys):
    """A 3-channel model trained at 64 px: each face found in a photo is cut out, decoded by the training decoder
    (data._decode: RGB, bilinear to data_size) and scored; predict's probabilities are exactly that model's."""
    from distributed.data import _decode
    from distributed.evaluate import predict

    out = tmp_path / "rgb"
    cfg = TrainConfig(model="small_cnn", data="synthetic", epochs=1, train_limit=100, batch_size=32, in_channels=3,
                      data_size=64)
    train_loop(cfg, None, LocalRun(device="cpu", checkpoint_dir=out))
    photo = background(400, 600)
    tint = np.array([1.0, 0.8, 0.6], np.float32)  # colour, so a grey crop would score differently
    photo[100:100 + FACE_PX, 200:200 + FACE_PX] = (np.asarray(ck_faces(1)[0]) * tint).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "one.png")
    assert main(["predict", str(out / BEST_FILE), str(tmp_path / "one.png"), "--json"]) == 0
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    x, y, w, h = rec["box"]
    assert iou(rec["box"], (200, 100, FACE_PX, FACE_PX)) > 0.5, rec["box"]

    Image.fromarray(photo[y:y + h, x:x + w]).save(tmp_path / "face.png")
    face = _decode(str(tmp_path / "face.png"), "RGB", 64)
    net, loaded, names, _ = load_model(out / BEST_FILE)
    # predict resizes to the model's input (a second resize, as in training)
    probs = predict(net, torch.from_numpy(face[None].copy()), loaded, torch.device("cpu")).softmax(1)[0]
    top = probs.topk(3)
    assert [(names[i], round(float(v), 5)) for v, i in zip(top.values, top.indices)] == \
        [(t["class"], round(t["p"], 5)) for t in rec["top3"]]


def test_predict_tta_flip_answers_a_face_and_its_mirror_alike(model_file, tmp_path, capsys):
    """--tta on one model file: flip averages the face with its mirror, so a face and its mirror image get the same
    probabilities, which without test-time augmentation they do not (the model is not exactly symmetric)."""
    face = Image.open(min(need(DATA / "ckplus48" / "test" / "happy").glob("*.png")))  # 48x48: a crop already
    face.save(tmp_path / "a.png")
    face.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "b_mirror.png")

    def top3(tta: str) -> list[list[dict]]:  # per photo: [{"class", "p"}] x 3
        assert main(["predict", str(model_file), str(tmp_path / "a.png"), str(tmp_path / "b_mirror.png"), "--json",
                     "--tta", tta]) == 0
        return [json.loads(line)["top3"] for line in capsys.readouterr().out.splitlines()]

    plain, mirror = top3("none")
    assert len(plain) == len(mirror) == 3
    assert [t["p"] for t in plain] != pytest.approx([t["p"] for t in mirror], abs=1e-6)
    face_, mirror_ = top3("flip")
    assert [t["class"] for t in face_] == [t["class"] for t in mirror_]
    assert [t["p"] for t in face_] == pytest.approx([t["p"] for t in mirror_], abs=1e-6)
