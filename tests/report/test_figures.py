import cv2
import numpy as np

from cifarcam.report.figures import (
    GalleryColumn,
    attribution_image,
    cam_gallery,
    image_grid,
    overlay,
    plot_curves,
    sanity_plot,
)


def test_overlay_shows_high_as_red_and_low_as_blue() -> None:
    gray = np.full((32, 32, 3), 128, np.uint8)
    cam = np.zeros((32, 32))
    cam[:, 16:] = 1.0
    out = overlay(gray, cam, alpha=1.0)
    assert tuple(out[0, 0]) == (0, 0, 128)  # JET at 0 is dark blue in RGB order
    assert tuple(out[0, 31]) == (128, 0, 0)  # JET at 1 is dark red


def read_png(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a PNG"
    return image


def test_figures_are_pngs() -> None:
    epochs = [
        {"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e, "train_acc": 0.3 * e, "test_acc": 0.25 * e}
        for e in (1, 2, 3)
    ]
    loss, accuracy = plot_curves(epochs)
    images = np.random.default_rng(0).random((4, 3, 32, 32))
    names = ["cat", "dog", "ship", "frog"]
    mistakes = image_grid(images, names, "t")
    maps = np.random.default_rng(1).random((4, 32, 32))
    columns = [GalleryColumn(["gradcam pred"] * 4, maps), GalleryColumn(["guided"] * 4, images - 0.5)]
    gallery = cam_gallery(images, columns, names, "t")
    rows = [
        {"randomized": s, "spearman": v, "spearman_std": 0.1, "ssim": v, "ssim_std": 0.1}
        for s, v in (("none", 1.0), ("linear", 0.2))
    ]
    sanity = sanity_plot(rows, [maps[0], maps[1]], "t")
    for png in (loss, accuracy, mistakes, gallery, sanity):
        height, width, _ = read_png(png).shape
        assert height > 150 and width > 150
    assert loss != accuracy
    assert read_png(gallery).shape[0] > read_png(gallery).shape[1]  # 4 rows x 3


def test_attributions_are_shown_around_mid_grey() -> None:
    flat = attribution_image(np.zeros((3, 4, 4)))
    assert flat.shape == (4, 4, 3) and (flat == 128).all()
    signed = np.zeros((3, 4, 4))
    signed[:, 0, 0], signed[:, 3, 3] = 1.0, -1.0
    shown = attribution_image(signed)
    assert shown[0, 0, 0] > 128 > shown[3, 3, 0]


def test_names_with_dollar_signs_are_drawn_as_text_not_mathtext() -> None:
    """'$x_y_z$' is a valid class (folder) or run name; as mathtext it would not even parse."""
    from cifarcam.report.figures import compare_curves, confusion_heatmap

    names = ["$x_y_z$", "$$", "a $ b", "$}$"]
    images = np.random.default_rng(0).random((4, 3, 32, 32))
    epochs = [{"epoch": 1, "lr": 0.1, "train_loss": 1.0, "test_loss": 1.2, "train_acc": 0.5, "test_acc": 0.4}]
    pngs = [
        image_grid(images, names, "$x_y_z$ mistakes"),
        cam_gallery(images, [GalleryColumn(names, images[:, 0])], names, "t"),
        confusion_heatmap([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], names),
        compare_curves({"$x_y_z$": epochs, "$$": epochs}),
    ]
    assert all(read_png(png).shape[0] > 150 for png in pngs)
