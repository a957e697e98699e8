"""Decoding and preprocessing without torch: parity with transformers, EXIF, bad files, draft mode, formats."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
from transformers.image_utils import PILImageResampling

from image_fixtures import corrupt_jpeg, huge_png_header, jpeg_bytes, make_photo_folder, photo_like, rotated_jpeg
from optional import needs
from rounding import U32
from uclip_cli import images
from uclip_cli.bundle import ImageSettings
from uclip_cli.extras import install_command
from uclip_cli.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    preprocess,
    preprocess_batch,
    read_image_bytes,
)

SIZES = [
    (1, 1), (2, 3), (3, 2), (7, 700), (700, 7), (223, 224), (224, 223), (224, 224), (225, 224),
    (224, 225), (333, 333), (640, 480), (480, 640), (1000, 563), (97, 131), (131, 97),
] + [tuple(int(v) for v in np.random.default_rng(n).integers(1, 900, 2)) for n in range(16)]

SIGLIP = dict(resize_mode="exact", crop=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def encode(picture: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    picture.save(out, fmt, **options)
    return out.getvalue()


def random_picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Noise over a gradient: every pixel differs, so any off-by-one in resize or crop shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(ramp + rng.integers(0, 96, (height, width, 3)), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    if mode == "RGBA":
        picture.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    elif mode == "P":
        picture = picture.quantize(50)
        picture.info["transparency"] = 3
    elif mode != "RGB":
        picture = picture.convert(mode)
    return picture


def elementwise_bound(settings: ImageSettings) -> float:
    """How far two float32 preprocessings of the same resized pixels may differ (both here are exactly equal).

    Each one casts x / 255 to float32 (u/2), subtracts the mean and divides by the std (one rounding
    each): per element at most (u/2 + u) / std + u |out|. Elementwise IEEE arithmetic is the same on
    every CPU, so this bound is about the two libraries' arithmetic, never about the machine.
    """
    mean, std = np.asarray(settings.mean), np.asarray(settings.std)
    largest = np.maximum(mean, 1 - mean) / std
    return float(2 * np.max(1.5 * U32 / std + U32 * largest))


def transformers_pixels(processor, pictures: list[Image.Image]) -> np.ndarray:
    return processor(images=pictures, return_tensors="np")["pixel_values"]


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_clip_preprocess_equals_clip_image_processor(size):
    picture = random_picture(*size, seed=size[0] * 1000 + size[1])
    expected = transformers_pixels(CLIPImageProcessorPil(), [picture])[0]
    got = preprocess(picture, ImageSettings())
    assert got.dtype == np.float32 and got.shape == expected.shape == (3, 224, 224)
    assert np.abs(got - expected).max() <= elementwise_bound(ImageSettings())


@pytest.mark.parametrize("side", [256, 336])
def test_clip_preprocess_follows_the_bundle_size(side):
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pictures = [random_picture(w, h, seed=w) for w, h in [(500, 301), (301, 500), (side, side + 1)]]
    expected = transformers_pixels(processor, pictures)
    got = preprocess_batch(pictures, ImageSettings(size=side))
    assert got.shape == expected.shape == (3, 3, side, side)
    assert np.abs(got - expected).max() <= elementwise_bound(ImageSettings(size=side))


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", SIZES[::3], ids=lambda s: f"{s[0]}x{s[1]}")
def test_siglip_preprocess_equals_siglip_image_processor(size, resample):
    pil_resample = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}[resample]
    processor = SiglipImageProcessorPil(size={"height": 256, "width": 256}, resample=pil_resample)
    picture = random_picture(*size, seed=size[1])
    expected = transformers_pixels(processor, [picture])[0]
    settings = ImageSettings(size=256, resample=resample, **SIGLIP)
    got = preprocess(picture, settings)
    assert got.shape == expected.shape == (3, 256, 256)
    assert np.abs(got - expected).max() <= elementwise_bound(settings)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK"])
def test_non_rgb_inputs_convert_as_transformers_does(mode):
    picture = random_picture(300, 200, seed=5, mode="RGBA" if mode == "LA" else mode)
    if mode == "LA":
        picture = picture.convert("LA")
    expected = transformers_pixels(CLIPImageProcessorPil(), [picture])[0]
    assert np.abs(preprocess(picture, ImageSettings()) - expected).max() <= elementwise_bound(ImageSettings())


def test_preprocess_batch_stacks_images_of_different_sizes():
    pictures = [random_picture(w, h, seed=w) for w, h in [(640, 480), (100, 900), (224, 224)]]
    batch = preprocess_batch(pictures, ImageSettings())
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    for row, picture in zip(batch, pictures):
        np.testing.assert_array_equal(row, preprocess(picture, ImageSettings()))


def test_resample_setting_changes_the_result():
    picture = random_picture(500, 400, seed=1)
    bicubic = preprocess(picture, ImageSettings())
    bilinear = preprocess(picture, ImageSettings(resample="bilinear"))
    assert np.abs(bicubic - bilinear).max() > 0.01


def test_unknown_settings_are_refused():
    picture = random_picture(50, 50, seed=1)
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess(picture, ImageSettings(resize_mode="longest_edge"))
    with pytest.raises(ValueError, match="resample"):
        preprocess(picture, ImageSettings(resample="lanczos"))


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("width,height,target_size", [(300, 200, None), (1600, 1200, 224)])
def test_exif_orientation_6_is_rotated_clockwise(width, height, target_size):
    picture = photo_like(width, height, seed=3)
    picture.paste((255, 0, 0), (0, 0, width // 4, height // 4))  # red marks the stored top-left corner
    data = rotated_jpeg(picture, orientation=6)

    decoded = decode_image(data, name="rotated.jpg", target_size=target_size)
    scale = 1 if target_size is None else 2  # 1600x1200 keeps a short side >= 448 at half scale
    assert decoded.size == (height // scale, width // scale)
    pixels = np.asarray(decoded, dtype=np.int16)
    top_right = pixels[: decoded.height // 10, -decoded.width // 10:]
    assert np.abs(top_right - [255, 0, 0]).max() < 40  # viewers show the top-left corner at the top right

    unrotated = decode_image(jpeg_bytes(picture), name="plain.jpg", target_size=target_size)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(unrotated.transpose(Image.Transpose.ROTATE_270)))


# ---------------------------------------------------------------- bad files


def _truncated(fmt: str) -> bytes:
    data = encode(photo_like(200, 150, seed=2), fmt)
    return data[: len(data) // 2]


BAD_FILES = {
    "empty": (b"", "empty", "empty file"),
    "text": (b"shopping list: milk, eggs\n", "not_image", "not an image (text file)"),
    "html": ("<html>404 – stránka nenalezena</html>".encode(), "not_image", "not an image (text file)"),
    "binary": (bytes(range(256)) * 8, "not_image", "not an image (unrecognised format)"),
    "corrupt jpeg": (corrupt_jpeg(jpeg_bytes(photo_like(200, 150, seed=1))), "corrupt", "corrupt JPEG"),
    "jpeg header only": (jpeg_bytes(photo_like(50, 50, seed=1))[:10], "truncated", "truncated JPEG"),
    "truncated jpeg": (_truncated("JPEG"), "truncated", "truncated JPEG file"),
    "truncated png": (_truncated("PNG"), "truncated", "truncated PNG file"),
    "truncated gif": (_truncated("GIF"), "truncated", "truncated GIF file"),
    "truncated tiff": (_truncated("TIFF"), "truncated", "truncated TIFF file"),
    "png signature only": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "corrupt", "corrupt PNG"),
    "bomb png": (huge_png_header(100_000, 100_000), "too_large", "image too large: 10000000000 px exceeds the"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_with_reason(case):
    data, kind, reason = BAD_FILES[case]
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, name=f"photos/{case}.jpg", target_size=224)
    assert caught.value.kind == kind
    assert caught.value.reason.startswith(reason)
    assert str(caught.value).startswith(f"photos/{case}.jpg: ")


def test_decode_error_survives_pickling_for_worker_processes():
    error = ImageDecodeError("a/b.jpg", "truncated", "truncated JPEG file")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.name, copy.kind, copy.reason, str(copy)) == ("a/b.jpg", "truncated", "truncated JPEG file", str(error))


# pytest resets the warning filters that uclip_cli.images installs at import.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_cap_is_checked_before_decoding():
    data = huge_png_header(20_000, 8_000)  # 160 MP declared, under Pillow's own guard; 60 bytes of pixels
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, name="big.png", target_size=224, max_pixels=100_000_000)
    assert caught.value.kind == "too_large"
    assert caught.value.reason == "image too large: 20000x8000 px exceeds the 100000000-pixel cap"


def test_max_pixels_admits_images_under_it():
    data = encode(photo_like(300, 200, seed=1), "PNG")
    assert decode_image(data, name="ok.png", target_size=None, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageDecodeError, match="300x200 px exceeds the 59999-pixel cap"):
        decode_image(data, name="ok.png", target_size=None, max_pixels=59_999)


def test_heic_without_pillow_heif_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(images, "heif_available", lambda: False)
    fake_heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(fake_heic, name="IMG_0001.HEIC", target_size=224)
    assert caught.value.kind == "unsupported"
    assert install_command("heif") in caught.value.reason


def test_unreadable_files(tmp_path):
    with pytest.raises(ImageDecodeError) as caught:
        read_image_bytes(tmp_path / "gone.jpg")
    assert caught.value.kind == "unreadable" and "No such file" in caught.value.reason
    with pytest.raises(ImageDecodeError) as caught:
        read_image_bytes(tmp_path)
    assert caught.value.kind == "unreadable" and caught.value.reason == "unreadable: is a directory"


# ---------------------------------------------------------------- draft mode


def test_draft_decode_stays_within_stated_tolerance():
    """Worst case for DRAFT_FACTOR 2: a 2400x1800 JPEG decodes at 1/4 = 600x450, short side just 2 x 224."""
    data = jpeg_bytes(photo_like(2400, 1800, seed=4, detail=0.85), quality=90)
    drafted = decode_image(data, name="big.jpg", target_size=224)
    full = decode_image(data, name="big.jpg", target_size=None)
    assert drafted.size == (600, 450) and full.size == (2400, 1800)
    diff = np.abs(preprocess(drafted, ImageSettings()) - preprocess(full, ImageSettings()))
    assert diff.max() <= 0.12 and diff.mean() <= 0.01


@pytest.mark.parametrize("size,decoded", [
    ((4000, 3000), (1000, 750)),   # 12 MP: 1/4 (1/8 would give a short side of 375 < 448)
    ((6000, 4000), (750, 500)),    # 24 MP: 1/8
    ((3000, 2250), (1500, 1125)),  # 2250 is not a multiple of 4: 1/2, so the geometry stays exact
    ((3375, 2250), (3375, 2250)),  # odd width: no reduced decode
    ((1000, 900), (500, 450)),
    ((896, 894), (896, 894)),      # half would give 447 < 448
    ((640, 480), (640, 480)),
])
def test_draft_scale_keeps_short_side_and_exact_geometry(size, decoded):
    data = jpeg_bytes(Image.new("RGB", size, (90, 140, 200)), quality=50)
    assert decode_image(data, name="flat.jpg", target_size=224).size == decoded
    if decoded != size:
        assert decode_image(data, name="flat.jpg", target_size=None).size == size


def test_draft_is_jpeg_only():
    data = encode(Image.new("RGB", (2000, 1000), (10, 20, 30)), "PNG")
    assert decode_image(data, name="flat.png", target_size=224).size == (2000, 1000)


# ---------------------------------------------------------------- formats


FORMATS = {
    "JPEG": (".jpg", {"quality": 95}),
    "PNG": (".png", {}),
    "WEBP": (".webp", {"lossless": True}),
    "GIF": (".gif", {}),
    "BMP": (".bmp", {}),
    "TIFF": (".tiff", {"compression": "tiff_lzw"}),
    "HEIF": (".heic", {"quality": 90}),
    "AVIF": (".avif", {"quality": 90}),
}
LOSSY = {"JPEG", "HEIF", "AVIF"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_supported_format_decodes(fmt):
    if fmt == "HEIF" and not images.heif_available():
        needs("pillow_heif", "the heif extra: pip install '.[heif]'")
    if fmt == "AVIF" and not images.avif_available():
        pytest.skip("this Pillow build has no AVIF codec")
    suffix, options = FORMATS[fmt]
    assert suffix in IMAGE_EXTENSIONS
    picture = photo_like(160, 120, seed=8)
    source = picture.quantize(256) if fmt == "GIF" else picture
    decoded = decode_image(encode(source, fmt, **options), name=f"photo{suffix}", target_size=224)
    assert decoded.mode == "RGB" and decoded.size == (160, 120)
    diff = np.abs(np.asarray(decoded, np.int16) - np.asarray(source.convert("RGB"), np.int16))
    assert diff.mean() < (8 if fmt in LOSSY else 1e-9)  # swapped channels or garbage give about 60


def test_transparency_is_composited_on_white():
    picture = Image.new("RGBA", (40, 30), (200, 10, 10, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    decoded = np.asarray(decode_image(encode(picture, "PNG"), name="a.png", target_size=None))
    assert (decoded[:, :20] == 255).all()
    assert (decoded[:, 20:] == [200, 10, 10]).all()


def test_animations_and_pages_give_the_first_frame():
    first, second = Image.new("RGB", (60, 40), (250, 0, 0)), Image.new("RGB", (60, 40), (0, 0, 250))
    for fmt in ("GIF", "TIFF", "WEBP"):
        data = encode(first, fmt, save_all=True, append_images=[second])
        decoded = np.asarray(decode_image(data, name=f"anim.{fmt}", target_size=224), np.int16)
        assert np.abs(decoded - [250, 0, 0]).max() < 8, fmt


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    decoded = np.asarray(decode_image(encode(Image.fromarray(ramp), "PNG"), name="scan.png", target_size=None))
    np.testing.assert_array_equal(decoded[0, :, 0], (ramp[0] >> 8).astype(np.uint8))


# ---------------------------------------------------------------- fixture folder


def test_fixture_folder_decodes_as_it_says(tmp_path):
    described = make_photo_folder(tmp_path / "photos")
    root = tmp_path / "photos"
    for rel in described["good"] + described["hidden"]:
        decoded = decode_image(read_image_bytes(root / rel), name=rel, target_size=224)
        assert decoded.mode == "RGB"
    for rel, kind in described["bad"].items():
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(read_image_bytes(root / rel), name=rel, target_size=224)
        assert caught.value.kind == kind, (rel, caught.value)
    assert decode_image(read_image_bytes(root / described["rotated"]), name="r", target_size=224).size == (200, 300)
    assert {"mačka na kauču.jpg", "写真.png"} <= {Path(rel).name for rel in described["good"]}
    assert {Path(rel).suffix for rel in described["good"]} >= {".jpg", ".png", ".webp", ".gif", ".bmp", ".tiff"}
    if "loop" in described:
        assert (root / described["loop"]).resolve() == root.resolve()


def test_fixture_folder_is_deterministic(tmp_path):
    first = make_photo_folder(tmp_path / "a")
    second = make_photo_folder(tmp_path / "b")
    assert first == second
    for rel in first["good"] + list(first["bad"]):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
