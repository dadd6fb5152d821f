import torch

from cifarcam.config import AugmentConfig
from cifarcam.data.augment import augment_batch, cutout, random_flip, random_translate


def batch(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_dtype_are_kept() -> None:
    out = augment_batch(batch(), AugmentConfig(flip=True, translate=4, cutout=8), gen())
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32


def test_same_seed_same_result_other_seed_differs() -> None:
    config = AugmentConfig(flip=True, translate=4, cutout=8)
    a = augment_batch(batch(), config, gen(1))
    b = augment_batch(batch(), config, gen(1))
    c = augment_batch(batch(), config, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_mirrors_or_keeps_each_image() -> None:
    x = batch(64)
    out = random_flip(x, gen())
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_translate_is_a_shift_of_the_reflect_padded_image() -> None:
    x = batch(32)
    out = random_translate(x, 4, gen())
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    shifts = set()
    for o, p in zip(out, padded, strict=True):
        found = [
            (dy, dx) for dy in range(9) for dx in range(9) if torch.equal(o, p[:, dy : dy + 32, dx : dx + 32])
        ]
        assert found, "every output must be a 32x32 window of the padded input"
        shifts.add(found[0])
    assert len(shifts) > 5
    assert torch.equal(random_translate(x, 0, gen()), x)


def test_cutout_zeroes_one_square_of_at_most_size_squared() -> None:
    x = torch.ones(50, 3, 32, 32)
    out = cutout(x, 8, gen())
    zeros = (out == 0).all(1).flatten(1).sum(1)
    assert zeros.max().item() == 64 and zeros.min().item() >= 16  # clipped at the edges at worst
    assert ((out == 0) | (out == 1)).all()


def test_labels_are_untouched_by_augmentation() -> None:
    # Augmentation maps images to images; labels travel separately and index the same rows.
    x = torch.zeros(10, 3, 32, 32)
    for i in range(10):
        x[i] = i  # constant image encodes its own index
    out = augment_batch(x, AugmentConfig(flip=True, translate=4, cutout=0), gen())
    assert torch.equal(out.mean(dim=(1, 2, 3)), torch.arange(10, dtype=torch.float32))
