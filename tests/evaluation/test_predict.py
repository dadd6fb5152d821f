"""`cifarcam predict` on your own images: any size and mode, the documented 32x32 transform,
top-k tables, --json, CAM overlays, and bad files among good ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_tree, invoke, snapshot, tiny_train_args
from PIL import Image

from cifarcam.data.datasets import synthetic_dataset
from cifarcam.errors import DataError
from cifarcam.evaluation.images import decode_image, read_image, to_model_input
from cifarcam.evaluation.inference import predict as engine_predict
from cifarcam.evaluation.predict import Predictor
from cifarcam.runs.rundir import RunDir


def a_photo(seed: int = 0) -> np.ndarray:
    """A 32x32 RGB image of the synthetic classes (H, W, 3) uint8."""
    return synthetic_dataset(1, 1, seed=seed).test.images[0].numpy().transpose(1, 2, 0).copy()


UNREADABLE = ("notes.txt", "cut.png", "half.png", "half.tif")


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per case: odd sizes, grayscale, RGBA, 16-bit, a palette PCX (which only Pillow reads), tiny, and bad files."""
    folder = tmp_path_factory.mktemp("odd-images")
    rgb = a_photo()
    bgr = rgb[:, :, ::-1]
    paths = {}

    def save(name: str, array: np.ndarray) -> None:
        paths[name] = folder / name
        assert cv2.imwrite(str(paths[name]), array)

    save("wide.jpg", cv2.resize(bgr, (97, 61), interpolation=cv2.INTER_CUBIC))
    save("gray.png", cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), (45, 70)))
    rgba = np.dstack([cv2.resize(bgr, (50, 50)), np.full((50, 50), 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a transparent stripe
    save("rgba.png", rgba)
    save("deep.png", cv2.resize(bgr, (33, 80)).astype(np.uint16) * 257)
    save("tiny.bmp", cv2.resize(bgr, (9, 5)))
    paths["palette.pcx"] = folder / "palette.pcx"
    Image.fromarray(cv2.resize(rgb, (40, 40))).convert("P").save(paths["palette.pcx"])
    paths["notes.txt"] = folder / "notes.txt"
    paths["notes.txt"].write_text("not an image\n")
    paths["cut.png"] = folder / "cut.png"
    paths["cut.png"].write_bytes(paths["gray.png"].read_bytes()[:40])
    save("whole.tif", cv2.resize(bgr, (64, 64)))
    for name, whole in (("half.png", "rgba.png"), ("half.tif", "whole.tif")):  # cut in their pixel data
        paths[name] = folder / name
        paths[name].write_bytes(paths[whole].read_bytes()[: paths[whole].stat().st_size // 2])
    return paths


def predict_tiny(runs: Path, *args: str):
    """`cifarcam predict` on the run 'tiny' under `runs`, on the CPU."""
    return invoke("predict", "--run", "tiny", "--runs-dir", str(runs), "--device", "cpu", *args)


# -- the transform, on pixels ---------------------------------------------------------


def test_decoding_modes_to_rgb() -> None:
    gray16 = np.array([[0, 257 * 10], [257 * 200, 65535]], np.uint16)
    rgb, mode = decode_image(cv2.imencode(".png", gray16)[1].tobytes(), "g")
    assert mode == "grayscale 16-bit"
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == [[0, 10], [200, 255]] and (rgb[..., 0] == rgb[..., 2]).all()
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[0, 0] = (255, 0, 0, 255)  # opaque blue
    bgra[0, 1] = (255, 0, 0, 0)  # transparent: white
    bgra[1, 0] = (0, 0, 255, 128)  # half red on white
    rgb, mode = decode_image(cv2.imencode(".png", bgra)[1].tobytes(), "a")
    assert mode == "RGBA 8-bit"
    assert rgb[0, 0].tolist() == [0, 0, 255] and rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [255, 127, 127]
    for bad in (b"", b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        with pytest.raises(DataError, match="'x' is not a readable image"):
            decode_image(bad, "x")


def test_a_float_image_with_nan_pixels_decodes_without_warnings() -> None:
    gray = np.array([[0.0, np.nan], [0.5, 2.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb, mode = decode_image(cv2.imencode(".tiff", gray)[1].tobytes(), "f")
    assert mode == "grayscale float"
    assert rgb[..., 0].tolist() == [[0, 0], [128, 255]]


def test_transform_crops_the_centre_square_and_keeps_32x32_pixels() -> None:
    image = a_photo()
    assert np.array_equal(to_model_input(image).pixels, image)  # 32x32 is left as it is
    big = cv2.resize(image, (128, 128), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(to_model_input(big).pixels, image)  # area averaging undoes a 4x enlargement
    wide = np.zeros((64, 100, 3), np.uint8)
    wide[:, 18:82] = big[::2, ::2]  # the picture in the middle, black bars either side
    shown = to_model_input(wide)
    assert shown.crop == (18, 0, 64) and shown.size == (100, 64)
    assert np.array_equal(shown.pixels, image)
    assert shown.describe() == "100x64 RGB 8-bit -> crop 64x64 at (18, 0) -> 32x32"
    assert to_model_input(np.zeros((5, 9, 3), np.uint8)).pixels.shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        ("rgb.tga", "RGB", "RGB 8-bit"),
        ("rgba.tga", "RGBA", "RGBA 8-bit"),
        ("gray.pcx", "L", "grayscale 8-bit"),
    ],
)
def test_files_only_pillow_reads_name_their_own_channels(
    name: str, mode: str, expected: str, tmp_path: Path
) -> None:
    rgb = cv2.resize(a_photo(), (40, 40))
    rgba = np.dstack([rgb, np.full((40, 40), 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a transparent stripe
    picture = Image.fromarray(rgba).convert(mode)
    path = tmp_path / name
    picture.save(path)
    assert cv2.imread(str(path)) is None  # OpenCV does not read it: Pillow decodes it
    image = read_image(path)
    assert image.mode == expected
    channels = np.asarray(picture.convert("RGB"))
    rgb_seen, _ = decode_image(path.read_bytes(), name)
    if mode == "RGBA":
        assert (rgb_seen[:, :10] == 255).all()  # transparent shows as white
        assert np.array_equal(rgb_seen[:, 10:], channels[:, 10:])
    else:
        assert np.array_equal(rgb_seen, channels)


def test_every_odd_file_reads(odd_images: dict[str, Path]) -> None:
    modes = {name: read_image(path).mode for name, path in odd_images.items() if name not in UNREADABLE}
    assert modes == {
        "wide.jpg": "RGB 8-bit",
        "gray.png": "grayscale 8-bit",
        "rgba.png": "RGBA 8-bit",
        "deep.png": "RGB 16-bit",
        "tiny.bmp": "RGB 8-bit",
        "whole.tif": "RGB 8-bit",
        "palette.pcx": "RGB 8-bit",
    }
    rgba = read_image(odd_images["rgba.png"])
    assert (rgba.pixels[:, :6] == 255).all()  # the transparent stripe is white after the transform


def test_predictions_match_the_test_set_inference(trained_runs: Path) -> None:
    """A 32x32 image gets exactly the probabilities the evaluation path computes for it."""
    predictor = Predictor.from_run(RunDir(trained_runs, "tiny"), device_name="cpu")
    images = np.stack([a_photo(seed) for seed in range(4)])
    expected = torch.softmax(
        engine_predict(
            predictor.model,
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            predictor.info.mean,
            predictor.info.std,
            channels_last=False,
        ),
        dim=1,
    )
    for image, probabilities in zip(images, expected, strict=True):
        assert torch.allclose(predictor.probabilities(image), probabilities, atol=1e-5)


# -- the command ------------------------------------------------------------------------


def test_predict_table_for_odd_sizes_and_modes(trained_runs: Path, odd_images: dict[str, Path]) -> None:
    good = [str(path) for name, path in odd_images.items() if name not in UNREADABLE]
    result = predict_tiny(trained_runs, *good)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{odd_images['wide.jpg']}: 97x61 RGB 8-bit -> crop 61x61 at (18, 0) -> 32x32" in out
    assert f"{odd_images['gray.png']}: 45x70 grayscale 8-bit -> crop 45x45 at (0, 12) -> 32x32" in out
    assert f"{odd_images['rgba.png']}: 50x50 RGBA 8-bit -> 32x32" in out
    assert f"{odd_images['deep.png']}: 33x80 RGB 16-bit -> crop 33x33 at (0, 23) -> 32x32" in out
    assert f"{odd_images['tiny.bmp']}: 9x5 RGB 8-bit -> crop 5x5 at (2, 0) -> 32x32" in out
    assert out.count("confidence") == len(good) and out.count("%") == 3 * len(good)
    assert result.stderr == ""


def test_a_bad_file_among_good_ones(trained_runs: Path, odd_images: dict[str, Path], tmp_path: Path) -> None:
    """In a real process: one line for each bad file, and the good ones predicted."""
    files = [
        odd_images["wide.jpg"],
        odd_images["notes.txt"],
        odd_images["cut.png"],
        tmp_path / "nope.png",
        odd_images["gray.png"],
    ]
    command = [sys.executable, "-m", "cifarcam", "predict", "--run", "tiny", "--runs-dir", str(trained_runs)]
    result = subprocess.run(
        [*command, "--device", "cpu", *map(str, files)],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: '{odd_images['notes.txt']}' is not a readable image",
        f"Error: '{odd_images['cut.png']}' is not a readable image",
        f"Error: '{tmp_path / 'nope.png'}' does not exist",
        "3 of 5 files failed",
    ]
    assert (
        f"{odd_images['wide.jpg']}: 97x61" in result.stdout
        and f"{odd_images['gray.png']}: 45x70" in result.stdout
    )


def test_json_document(trained_runs: Path, odd_images: dict[str, Path], tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    before = snapshot(runs)
    out = tmp_path / "overlays"
    files = [odd_images["wide.jpg"], odd_images["notes.txt"], odd_images["rgba.png"]]
    result = invoke(
        "predict", "--run", "tiny", "--runs-dir", str(runs), "--device", "cpu", "--json", "--top-k", "4",
        "--cam", "--layer", "layer3", "--layer", "layer4", "--layer", "layer3", "--class", "class7",
        "--out", str(out), *map(str, files),
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: '{odd_images['notes.txt']}' is not a readable image"]
    document = json.loads(result.stdout)
    assert set(document) == {"run", "checkpoint", "epoch", "classes", "transform", "images", "failed"}
    assert (document["run"], document["checkpoint"], document["epoch"], document["failed"]) == (
        "tiny",
        "last",
        2,
        1,
    )
    assert document["classes"] == [f"class{i}" for i in range(10)]
    assert "centre-crop" in document["transform"]
    wide, notes, rgba = document["images"]
    assert notes == {
        "path": str(odd_images["notes.txt"]),
        "ok": False,
        "error": f"'{odd_images['notes.txt']}' is not a readable image",
    }
    assert set(wide) == {"path", "ok", "width", "height", "mode", "crop", "transform", "top_k", "overlays"}
    assert (wide["ok"], wide["width"], wide["height"], wide["mode"]) == (True, 97, 61, "RGB 8-bit")
    assert wide["crop"] == {"x": 18, "y": 0, "side": 61}
    for entry in (wide, rgba):
        probabilities = [row["probability"] for row in entry["top_k"]]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert {row["class"] for row in entry["top_k"]} <= set(document["classes"])
        pred = entry["top_k"][0]["class"]
        drawn = {(o["target"], o["class"], o["method"], o["layer"]) for o in entry["overlays"]}
        assert drawn == {
            (target, name, "gradcam", layer)
            for target, name in (("pred", pred), ("class", "class7"))
            for layer in ("layer3", "layer4")
        }
        assert len(entry["overlays"]) == len(drawn)  # a layer given twice is drawn once
        for overlay in entry["overlays"]:
            path = Path(overlay["path"])
            assert path.parent == out and path.name.startswith(Path(entry["path"]).stem + "_gradcam_")
            image = cv2.imread(str(path))
            assert image is not None and image.shape == (256, 256, 3)
    by_layer = {o["layer"]: cv2.imread(o["path"]) for o in wide["overlays"] if o["target"] == "pred"}
    assert not np.array_equal(by_layer["layer3"], by_layer["layer4"])
    assert snapshot(runs) == before  # nothing written into the run directory


def test_predict_needs_only_the_checkpoint(
    trained_runs: Path, odd_images: dict[str, Path], tmp_path: Path
) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    config = json.loads((runs / "tiny" / "config.json").read_text())
    (runs / "tiny" / "config.json").write_text(json.dumps(config | {"data": str(tmp_path / "gone")}))
    result = invoke(
        "predict", "--run", "tiny", "--runs-dir", str(runs), "--device", "cpu", str(odd_images["gray.png"])
    )
    assert result.exit_code == 0, result.output


def test_the_default_top_k_lists_every_class_of_a_two_class_run(
    synthetic_tree: Path, odd_images: dict[str, Path], tmp_path: Path
) -> None:
    tree = copy_tree(synthetic_tree, tmp_path / "tree")
    for split in ("train", "test"):
        for folder in sorted((tree / split).iterdir())[2:]:
            shutil.rmtree(folder)
    runs = tmp_path / "runs"
    assert invoke(*tiny_train_args(runs, tree, epochs=1)).exit_code == 0
    result = invoke("predict", "--run", "r", "--runs-dir", str(runs), "--json", str(odd_images["gray.png"]))
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)["images"][0]["top_k"]
    assert sorted(entry["class"] for entry in listed) == ["class0", "class1"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--top-k", "0"], "Error: --top-k must be between 1 and 10 (got 0)"),
        (["--top-k", "11"], "Error: --top-k must be between 1 and 10 (got 11)"),
        (
            ["--class", "zebra"],
            "Error: unknown class 'zebra'; classes: " + ", ".join(f"class{i}" for i in range(10)),
        ),
        (
            ["--cam", "--method", "guesscam"],
            "Error: unknown CAM method 'guesscam'; choose one of: gradcam, gradcam++, xgradcam, layercam, hirescam, scorecam, eigencam",
        ),
        (
            ["--cam", "--out", "RUN/overlays"],
            "Error: --out 'RUN/overlays' is inside run 'tiny'; predictions never write into a run",
        ),
    ],
)
def test_bad_options_exit_2_before_reading_images(
    trained_runs: Path, odd_images: dict[str, Path], options: list[str], message: str
) -> None:
    run_path = str(trained_runs / "tiny")
    options = [option.replace("RUN", run_path) for option in options]
    result = predict_tiny(trained_runs, *options, str(odd_images["gray.png"]))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [message.replace("RUN", run_path)]
    assert result.stdout == ""


def test_unknown_layer_is_a_usage_error(trained_runs: Path, odd_images: dict[str, Path]) -> None:
    result = predict_tiny(trained_runs, "--layer", "layer5", str(odd_images["gray.png"]))
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: unknown layer 'layer5'")


def test_predict_of_a_missing_run(runs_dir: Path, odd_images: dict[str, Path]) -> None:
    result = invoke("predict", "--run", "nope", "--runs-dir", str(runs_dir), str(odd_images["gray.png"]))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"Error: run 'nope' does not exist in '{runs_dir}'"


def test_output_names_stay_distinct_past_names_already_taken() -> None:
    from cifarcam.evaluation.predict import _unique_stems

    paths = [Path("x/a.png"), Path("y/a.jpg"), Path("a-2.png"), Path("z/a.webp")]
    assert _unique_stems(paths) == ["a", "a-2", "a-2-2", "a-3"]


def test_a_long_file_name_gets_a_short_overlay_name(
    trained_runs: Path, odd_images: dict[str, Path], tmp_path: Path
) -> None:
    """A name far beyond the 255 bytes a file name may hold: its overlays take its first 100 characters."""
    long_name = tmp_path / ("a" * 240 + ".png")
    shutil.copy(odd_images["gray.png"], long_name)
    out = tmp_path / "overlays"
    result = predict_tiny(trained_runs, "--json", "--cam", "--out", str(out), str(long_name))
    assert result.exit_code == 0, result.output
    [overlay] = json.loads(result.stdout)["images"][0]["overlays"]
    assert Path(overlay["path"]).name.startswith("a" * 100 + "_gradcam_layer4_pred-")
    assert Path(overlay["path"]).is_file()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_exif_orientation_is_applied_in_colour_and_grayscale(mode: str) -> None:
    """A camera JPEG stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to
    show): decoded as shown, portrait, with the bright left column of the stored image on top."""
    import io

    stored = np.zeros((40, 64), np.uint8)  # 64 wide, 40 high
    stored[:, :16] = 255
    image = Image.fromarray(stored).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    rgb, _ = decode_image(buffer.getvalue(), "photo.jpg")
    assert rgb.shape == (64, 40, 3)
    assert rgb[:16].mean() > 200 and rgb[20:].mean() < 50
