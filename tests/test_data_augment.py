"""Batched crop/flip and normalisation."""

import math

import torch

from lfm.data import ImagePrepare, normalize, random_crop_flip


def _images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_shape_and_dtype_preserved():
    x = _images(5, h=8, w=6)
    out = random_crop_flip(x, pad=4)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_crop_is_a_shift_of_the_padded_image():
    x, pad = _images(64), 2
    out = random_crop_flip(x, pad=pad, flip_prob=0.0)
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    shifts = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], xp[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(hits) == 1  # random pixels: exactly one window matches
        shifts.add(hits[0])
    assert len(shifts) > 10  # offsets really vary across the batch


def test_flip_happens_for_about_half():
    n = 4000
    x = _images(n, c=1, h=2, w=3)
    out = random_crop_flip(x, pad=0)
    flipped = torch.all((out == x.flip(3)).flatten(1), 1)
    same = torch.all((out == x).flatten(1), 1)
    assert torch.all(flipped ^ same)
    assert abs(flipped.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


def test_generator_makes_it_reproducible():
    x = _images(16)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_normalize_per_channel():
    x = torch.stack([torch.full((4, 4), 0.5), torch.full((4, 4), 1.0)]).unsqueeze(0)
    out = normalize(x, [0.5, 0.0], [1.0, 2.0])
    assert torch.allclose(out[0, 0], torch.zeros(4, 4)) and torch.allclose(
        out[0, 1], torch.full((4, 4), 0.5)
    )


def test_image_prepare_uint8():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    prep = ImagePrepare([0.5] * 3, [0.25] * 3, augment=True)
    ev = prep(x, False)
    assert ev.dtype == torch.float32 and torch.allclose(ev, (x.float() / 255 - 0.5) / 0.25)
    torch.manual_seed(0)
    assert prep(x, True).shape == x.shape and not torch.equal(prep(x, True), ev)
    assert torch.equal(ImagePrepare([0.5] * 3, [0.25] * 3, augment=False)(x, True), ev)


def test_image_prepare_pickles():
    import pickle

    prep = ImagePrepare([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], augment=False)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(pickle.loads(pickle.dumps(prep))(x), prep(x))
