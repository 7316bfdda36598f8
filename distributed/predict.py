"""What a trained model is for: `emotune predict` finds the faces in ordinary photos, classifies each, and can draw
them; `emotune export` writes the model as ONNX or TorchScript with its preprocessing beside it.

Faces are found with OpenCV's frontal-face Haar cascade, which ships inside opencv-python-headless (nothing is
downloaded at run time). Each face is cropped, converted and resized exactly as training images were decoded
(data._decode: PIL convert to grey or RGB, bilinear resize to data_size), then predict() prepares the batch as the
loop does. A photo no larger than the training size is taken to be a face crop already (as FER2013 and CK+48
images are) and is classified whole.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distributed import storage
from distributed.config import ConfigError
from distributed.data import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CASCADE = "haarcascade_frontalface_default.xml"
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXPORT_FORMAT = "emotune-export/1"


@dataclass
class Face:
    image: str
    box: tuple[int, int, int, int]  # x, y, width, height in the photo's pixels
    ranked: list[tuple[str, float]]  # (class, probability), most likely first (top 3)

    def record(self, index: int) -> dict:
        return {"image": self.image, "face": index, "box": list(self.box), "class": self.ranked[0][0],
                "confidence": self.ranked[0][1], "top3": [{"class": c, "p": p} for c, p in self.ranked]}


def image_files(paths: list[str]) -> list[Path]:
    """Files as given; a folder stands for the images directly inside it."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            out += found
        elif not p.is_file():
            raise DataError(f"{p}: no such file or folder; pass photos or folders of photos")
        else:
            out.append(p)
    return out


def read_photo(path: Path) -> np.ndarray:
    """uint8 RGB [H, W, 3]; an unreadable file is an error (the user named it and expects an answer)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 (any decoder failure means the same to the user)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise DataError(f"{path}: cannot read this image ({reason}); pass PNG/JPEG photos") from None


def find_faces(rgb: np.ndarray, data_size: int) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h), left to right; the whole image when it is no larger than the training size."""
    import cv2

    h, w = rgb.shape[:2]
    if h <= data_size and w <= data_size:
        return [(0, 0, w, h)]
    detector = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if detector.empty():
        raise ConfigError(f"OpenCV has no {CASCADE} in {cv2.data.haarcascades}; install opencv-python-headless<5")
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    found = detector.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(max(24, data_size // 2),) * 2)
    return sorted((tuple(int(v) for v in box) for box in found), key=lambda b: (b[0], b[1]))


def crop(rgb: np.ndarray, box, in_channels: int, size: int) -> np.ndarray:
    """uint8 [C, size, size], converted and resized as data._decode does for training files."""
    x, y, w, h = box
    img = Image.fromarray(rgb[y:y + h, x:x + w]).convert("L" if in_channels == 1 else "RGB")
    arr = np.asarray(img.resize((size, size), Image.BILINEAR) if img.size != (size, size) else img, np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def classify_photos(model_path: str, paths: list[str], tta: str | None = None) -> list[tuple[Path, np.ndarray, list[Face]]]:
    """-> [(photo path, RGB pixels, faces)], photos in order; every photo is read before the model is loaded, so an
    unreadable one is refused before any work (and before torch is imported). The model may be one model file or
    an ensemble file."""
    photos = [(p, read_photo(p)) for p in image_files(paths)]
    import torch

    from distributed.ensemble import load_predictor

    model = load_predictor(model_path)
    cfg, names = model.config, model.class_names
    out = []
    for path, rgb in photos:
        boxes = find_faces(rgb, cfg.data_size)
        faces = []
        if boxes:
            x = torch.from_numpy(np.stack([crop(rgb, b, cfg.in_channels, cfg.data_size) for b in boxes]))
            for box, p in zip(boxes, model.probs(x, tta)):
                top = p.topk(min(3, len(names)))
                faces.append(Face(str(path), box, [(names[i], float(v)) for v, i in zip(top.values, top.indices)]))
        out.append((path, rgb, faces))
    return out


def annotate(rgb: np.ndarray, faces: list[Face], out: Path) -> None:
    """The photo with a box and 'class probability' over each face."""
    import cv2

    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    thick = max(1, round(max(img.shape[:2]) / 400))
    for face in faces:
        x, y, w, h = face.box
        cv2.rectangle(img, (x, y), (x + w, y + h), (0, 200, 0), thick)
        label = f"{face.ranked[0][0]} {face.ranked[0][1]:.2f}"
        scale = max(0.4, w / 220)
        cv2.putText(img, label, (x, max(12, y - 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 200, 0), thick, cv2.LINE_AA)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")  # cv2 picks the encoder from the suffix
    if not cv2.imwrite(str(tmp), img):
        raise DataError(f"{out}: cannot write an image there; pass --annotate a writable PATH.png")
    tmp.replace(out)


def run_predict(model: str, images: list[str], as_json: bool = False, annotate_to: str | None = None,
                tta: str | None = None) -> int:
    """`emotune predict`: one line (or JSON record) per face; a photo without a face says so."""
    results = classify_photos(model, images, tta)
    target = Path(annotate_to) if annotate_to else None
    for path, rgb, faces in results:
        if not faces:
            print(json.dumps({"image": str(path), "face": None, "box": None, "class": None,
                              "note": "no face found"}) if as_json else f"{path}: no face found")
        for i, face in enumerate(faces):
            if as_json:
                print(json.dumps(face.record(i)))
            else:
                x, y, w, h = face.box
                print(f"{path} face {i} at x={x} y={y} w={w} h={h}: {face.ranked[0][0]} ({face.ranked[0][1]:.2f})"
                      f"  top3: " + ", ".join(f"{c} {p:.2f}" for c, p in face.ranked))
        if target is not None:
            # one photo: --annotate names the file; several: a folder of PNGs named after the photos
            annotate(rgb, faces, target if len(results) == 1 else target / f"{path.stem}.png")
    return 0


# ---------------------------------------------------------------------------------------------- export

def export(model: str, fmt: str, output: str | None = None) -> tuple[Path, Path]:
    """Write the network as ONNX or TorchScript (input: a float batch [N, C, size, size] already normalised; output:
    logits; any batch size) and, beside it, a JSON file with the class names and the preprocessing."""
    if fmt not in EXPORT_FORMATS:  # answered before torch is imported
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    import torch

    from distributed.ensemble import ENSEMBLE_FORMAT
    from distributed.evaluate import MEAN, STD, input_size
    from distributed.modelfile import MODEL_FORMAT, load_file, load_model

    if load_file(model, (MODEL_FORMAT, ENSEMBLE_FORMAT))["format"] == ENSEMBLE_FORMAT:
        raise ConfigError(f"{model}: is an ensemble of several networks; export exports one: export a member's "
                          f"best_model.pt (ensemble.json lists their files)")
    net, cfg, names, metrics = load_model(model)
    size = input_size(cfg)
    out = Path(output) if output else Path(model).with_suffix(EXPORT_FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    example = torch.randn(2, cfg.in_channels, size, size)
    if fmt == "onnx":
        torch.onnx.export(net, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    else:
        # torch.jit is deprecated in favour of torch.export, but TorchScript is still what libtorch (C++) and
        # TorchServe load, which is why someone asks for it: the warning is not theirs to act on.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            torch.jit.trace(net, example).save(str(tmp))
    tmp.replace(out)
    meta = {"format": EXPORT_FORMAT, "file": out.name, "export_format": fmt, "model": cfg.model,
            "class_names": list(names), "output": "logits [N, classes]; softmax gives probabilities",
            "input": {"name": "image", "shape": ["N", cfg.in_channels, size, size], "dtype": "float32",
                      "color": "grey" if cfg.in_channels == 1 else "RGB",
                      "steps": [(f"convert to {'L (grey)' if cfg.in_channels == 1 else 'RGB'} and resize to "
                                 f"{cfg.data_size}x{cfg.data_size} (PIL bilinear)"),
                                f"resize to {size}x{size} (bilinear, no antialias)" if size != cfg.data_size else
                                "no second resize", "divide by 255", "subtract mean, divide by std per channel"],
                      "data_size": cfg.data_size, "size": size,
                      "mean": list(MEAN[cfg.in_channels]), "std": list(STD[cfg.in_channels])},
            "metrics": metrics, "source": str(Path(model).resolve())}
    meta_path = out.with_name(out.name + ".json")
    storage.write_text(str(meta_path), json.dumps(meta, indent=2) + "\n")
    return out, meta_path
