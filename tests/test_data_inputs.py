"""Hostile and broken inputs to the data-set readers: every bad list file, annotation .mat and
image ends in one FinegrainError that names the file (and line) and the fix; high-bit-depth images
decode to their true values. The fakes are test_data's native layouts, then broken one way each."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from finegrain.data import DEMO_ROOT, BadImageWarning, ImageDataset, Sample, check_images, decode_rgb, kinds
from finegrain.data import lists, load_splits, matfile
from finegrain.errors import FinegrainError
from test_data import _aircraft, _cars, _cub, _food101, _pets, _put, _sop


FAKES = {"food101": _food101, "pets": _pets, "sop": _sop, "cub200": _cub, "aircraft": _aircraft}
Change = Callable[[Path], None]


def _plus(relative: str, line: str) -> Change:
    """Append `line` to the fake's list file `relative`."""
    def change(root: Path) -> None:
        with (root / relative).open("a", encoding="utf-8") as stream:
            stream.write(line + "\n")
    return change


def _swap(relative: str, old: str, new: str) -> Change:
    """Replace the first `old` in the fake's list file `relative`."""
    def change(root: Path) -> None:
        text = (root / relative).read_text()
        assert old in text
        (root / relative).write_text(text.replace(old, new, 1))
    return change


def _food_train(data: bytes) -> Change:
    """Food-101's train.txt as one good line, then `data`."""
    return lambda root: (root / "meta" / "train.txt").write_bytes(b"apple_pie/100\n" + data + b"\n")


AIR_TEST, PETS_TEST = "data/images_variant_test.txt", "annotations/test.txt"
# kind, change of its valid fake, expected message: the file, the line and what is wrong
BAD_LISTS: list[tuple[str, Change, str]] = [
    ("food101", _food_train("crème_brûlée/7".encode("latin-1")),
     r"meta/train.txt, line 2: not UTF-8 text \(byte 0xe8\). Save the file as UTF-8"),
    ("food101", _food_train(b"apple_pie 101"), r"train.txt, line 2 \('apple_pie 101'\): expected one"),
    ("food101", _food_train(b"apple_pie/.."), r"train.txt, line 2: 'apple_pie/..' is not a relative"),
    ("food101", _food_train(b"pizza/1"), r"train.txt, line 2: class 'pizza' is not among the 3"),
    ("food101", _plus("meta/test.txt", "apple_pie/101"),
     r"test.txt, line 7: image .*apple_pie/101.jpg' is listed again \(first at .*train.txt, line 2\)"),
    ("food101", _plus("meta/classes.txt", "baklava"),
     r"classes.txt, line 4: class 'baklava' is listed again \(first at .*classes.txt, line 3\)"),
    ("food101", lambda root: (root / "meta" / "test.txt").write_text(""), r"test split of .* holds no images"),
    ("pets", _plus(PETS_TEST, "Bengal_4 3 1"),
     r"test.txt, line 6 \('Bengal_4 3 1'\): expected 4 fields \('Image_name CLASS-ID SPECIES BREED-ID'\), found 3"),
    ("pets", _plus(PETS_TEST, "Bengal_4 3.0 1 2"),
     r"test.txt, line 6 .*: CLASS-ID must be a whole number from 1 to 999,999,999, got '3.0'"),
    ("pets", _plus(PETS_TEST, "Bengal_4 0 1 2"), r"CLASS-ID must be a whole number from 1 .*got '0'"),
    ("pets", _plus(PETS_TEST, "Bengal_4 3 7 2"), r"line 6 .*: SPECIES must be 1 \(cat\) or 2 \(dog\), got '7'"),
    ("pets", _plus(PETS_TEST, "Persian_4 5 1 2"), r"class ids in .*annotations are not 1..4: no image of class 4"),
    ("pets", _plus(PETS_TEST, "Persian_4 3 1 2"),
     r"test.txt, line 6 .*: class id 3 is the breed 'Bengal' at .*trainval.txt, line 5, not 'Persian'"),
    ("pets", _plus(PETS_TEST, "../../secret 3 1 2"), r"test.txt, line 6: '../../secret' is not a file name without"),
    ("pets", _plus(PETS_TEST, "Abyssinian_100 1 1 1"),
     r"test.txt, line 6: image 'Abyssinian_100' is listed again \(first at .*trainval.txt, line 3\)"),
    ("sop", _plus("Ebay_test.txt", "12 5 2 /etc/passwd"),
     r"Ebay_test.txt, line 6: '/etc/passwd' is not a relative path below the data folder"),
    ("sop", _plus("Ebay_test.txt", "12 5 2 cabinet_final/../../../x.JPG"),
     r"line 6: 'cabinet_final/../../../x.JPG' is not a relative path"),
    ("sop", _plus("Ebay_test.txt", "12 5 2 C:\\x.JPG"), r"'C:\\\\x.JPG' is not a relative"),
    ("sop", _plus("Ebay_test.txt", "12 -5 2 cabinet_final/x.JPG"), r"line 6 .*: class_id must be a whole number"),
    ("sop", _plus("Ebay_test.txt", "12 5 cabinet_final/x.JPG"), r"expected 4 fields"),
    ("sop", _plus("Ebay_test.txt", "12 5 2 cabinet_final/4_0.JPG"),
     r"Ebay_test.txt, line 6: image .*cabinet_final/4_0.JPG' is listed again \(first at .*Ebay_test.txt, line 2\)"),
    ("sop", _plus("Ebay_test.txt", "12 3 2 cabinet_final/3_9.JPG"),
     r"Ebay_test.txt, line 6: product 3 is also in the train split \(.*Ebay_train.txt, line 6\); retrieval"),
    ("cub200", _plus("images.txt", "3 dup.jpg"),
     r"images.txt, line 15 \('3 dup.jpg'\): image_id 3 is listed again \(first at line 3\)"),
    ("cub200", _plus("images.txt", "15 /etc/passwd"), r"line 15: '/etc/passwd' is not"),
    ("cub200", _swap("image_class_labels.txt", "1 1\n", ""),
     r"images.txt, line 1 .*: image 1 has no line in image_class_labels.txt"),
    ("cub200", _plus("image_class_labels.txt", "3 2"),
     r"image_class_labels.txt, line 15 \('3 2'\): image_id 3 is listed again \(first at line 3\)"),
    ("cub200", _swap("image_class_labels.txt", "1 1\n", "1 9\n"),
     r"image_class_labels.txt, line 1 \('1 9'\): class 9 is not in classes.txt"),
    ("cub200", _swap("classes.txt", "1 ", "one "), r"classes.txt, line 1 .*class_id must"),
    ("cub200", _plus("classes.txt", "5 002.Laysan_Albatross"),
     r"classes.txt, line 5: class name '002.Laysan_Albatross' is listed again"),
    ("aircraft", _plus(AIR_TEST, "1514525"), r"images_variant_test.txt, line 4 \('1514525'\): expected two fields"),
    ("aircraft", _plus(AIR_TEST, "x/../../y F-16A/B"), r"line 4: 'x/../../y' is not a file name without folders"),
    ("aircraft", _plus(AIR_TEST, "1514525 Boeing 999"),
     r"images_variant_test.txt, line 4: class 'Boeing 999' is not among the 3 known classes"),
    ("aircraft", _plus(AIR_TEST, "0034309 F-16A/B"),
     r"line 4: image id '0034309' is listed again \(first at .*images_variant_trainval.txt, line 1\)"),
]


@pytest.mark.parametrize("kind,change,message", BAD_LISTS, ids=[f"{row[0]}-{i}" for i, row in enumerate(BAD_LISTS)])
def test_bad_list_files_name_the_file_the_line_and_the_fix(tmp_path: Path, kind, change, message) -> None:
    FAKES[kind](tmp_path)
    change(tmp_path)
    with pytest.raises(FinegrainError, match=message) as caught:
        load_splits(kind, tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_list_files_are_bounded_before_they_are_read(tmp_path: Path) -> None:
    _food101(tmp_path)
    train = tmp_path / "meta" / "train.txt"
    with train.open("r+b") as stream:  # sparse: costs no disk
        stream.truncate(lists.MAX_LIST_BYTES + 1)
    with pytest.raises(FinegrainError, match=r"train.txt is larger than 64 MiB, far beyond any list file"):
        load_splits("food101", tmp_path)
    train.write_bytes(b"\n" * lists.MAX_LIST_LINES)
    with pytest.raises(FinegrainError, match=r"train.txt has more than 2,000,000 lines"):
        load_splits("food101", tmp_path)
    train.write_bytes(b"\xef\xbb\xbfapple_pie/100\r\napple_pie/101\r\n")  # a BOM and CRLF, as Windows editors save
    assert len(load_splits("food101", tmp_path)["train"]) == 2


def test_a_public_kind_pointed_at_class_folders_names_kind_folder(tmp_path: Path) -> None:
    _put(tmp_path / "roses" / "1.jpg")
    with pytest.raises(FinegrainError, match=r"Missing .*meta/train.txt\. .*your own images in class folders .*"
                                             r"--kind folder, or --set data.kind=folder"):
        load_splits("food101", tmp_path)


# ---------------------------------------------------------------- MATLAB annotation files

def _header(version: int = 0x0100) -> bytes:
    return b"MATLAB 5.0 MAT-file, crafted".ljust(116, b" ") + bytes(8) + struct.pack("<H", version) + b"IM"


def _element(kind: int, payload: bytes) -> bytes:
    return struct.pack("<II", kind, len(payload)) + payload + bytes(-len(payload) % 8)


def _array(array_class: int, dims: tuple[int, ...], body: bytes = b"", name: bytes = b"annotations") -> bytes:
    flags = _element(6, struct.pack("<II", array_class, 0))
    return _element(14, flags + _element(5, struct.pack(f"<{len(dims)}i", *dims)) + _element(1, name) + body)


def _nested_cells(depth: int) -> bytes:
    inner = _array(6, (1, 1), _element(9, struct.pack("<d", 1.0)), b"")
    for _ in range(depth):
        inner = _array(1, (1, 1), inner, b"")
    return inner


def _compressed(variable: bytes) -> bytes:
    data = zlib.compress(variable)
    return struct.pack("<II", 15, len(data)) + data


CRAFTED_MATS = [
    (b"", r"0 bytes is shorter than the 128-byte header"),
    (b"not a matlab file at all" * 10, r"not a MATLAB v5 file"),
    (_header(0x0200), r"does not give MATLAB v5 format .* v7.3 files are HDF5, save with -v7"),
    (_header() + _array(1, (1, 2 ** 30)), r"declares 1,073,741,824 elements; only 0 bytes hold them"),
    (_header() + _array(1, (65536, 65536, 2)), r"declares 8,589,934,592 elements"),
    (_header() + _array(2, (1, 2 ** 30), struct.pack("<HHi", 5, 4, 8) + _element(1, b"class\0\0\0")),
     r"declares 1,073,741,824 elements"),
    (_header() + _array(1, (-1, 5)), r"negative dimension -1"),
    (_header() + _nested_cells(40), r"nested more than 16 deep"),
    (_header() + _array(6, (2, 2), _element(9, bytes(32)))[:-8], r"runs past the end|only .* follow"),
    (_header() + _array(16, (1, 1)), r"MATLAB class 16 \(function handles"),
    # a data part of unknown type: scipy indexes its type table with it unchecked and crashes (fuzzing found it)
    (_header() + _array(6, (1, 1), struct.pack("<HHI", 195, 1, 2)), r"holds data of unknown type 195"),
    (_header() + _element(14, _element(6, bytes(8)) + _element(5, bytes(8)) + _element(9, b"name")),
     r"has a name of type 9, not int8 text"),
    (_header() + _compressed(_array(1, (1, 2 ** 30))), r"declares 1,073,741,824 elements"),
    (_header() + struct.pack("<II", 15, 64) + bytes(64), r"compressed variable is corrupt"),
]


@pytest.mark.parametrize("content,message", CRAFTED_MATS, ids=[m[:30] for _, m in CRAFTED_MATS])
def test_crafted_mat_files_are_refused_before_scipy_allocates(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "cars_annos.mat").write_bytes(content)
    with pytest.raises(FinegrainError, match=r"Cannot read .*cars_annos.mat as a MATLAB file: .*" + message):
        load_splits("cars196", tmp_path)


def test_mat_inflation_and_size_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": np.zeros(300_000), "class_names": ["a"]},
                     do_compression=True)  # 2.4 MB of doubles in a few KB
    monkeypatch.setattr(matfile, "MAX_INFLATED_BYTES", 1 << 20)
    with pytest.raises(FinegrainError, match=r"compressed variables expand to more than 1 MiB"):
        load_splits("cars196", tmp_path)
    monkeypatch.setattr(matfile, "MAX_MAT_BYTES", 1 << 10)
    _cars(tmp_path)
    with pytest.raises(FinegrainError, match=r"cars_annos.mat is larger than 1,024 bytes, far beyond any MATLAB"):
        load_splits("cars196", tmp_path)


def test_truncated_and_bit_flipped_mat_files_end_in_one_clear_error(tmp_path: Path) -> None:
    """Every prefix-cut and 150 random single-byte changes of a real (fake-cars) file: a load or a FinegrainError."""
    _cars(tmp_path)
    path = tmp_path / "cars_annos.mat"
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    variants = [original[:cut] for cut in range(0, len(original), 37)]
    for _ in range(150):
        flipped = bytearray(original)
        flipped[int(rng.integers(len(original)))] = int(rng.integers(256))
        variants.append(bytes(flipped))
    outcomes = {"loaded": 0, "refused": 0}
    for content in variants:
        path.write_bytes(content)
        try:
            load_splits("cars196", tmp_path)
            outcomes["loaded"] += 1
        except FinegrainError as error:
            assert str(path) in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > len(variants) // 2 and outcomes["loaded"] > 0


def _cars_with(root: Path, **changes: object) -> None:
    """The fake cars_annos.mat with some annotation fields or variables replaced."""
    _cars(root)
    content = scipy.io.loadmat(root / "cars_annos.mat")
    annotations = content["annotations"]
    for key, value in changes.items():
        if key in annotations.dtype.names:
            annotations[0, 0][key] = value
        else:
            content[key] = value
    scipy.io.savemat(root / "cars_annos.mat", {k: v for k, v in content.items() if not k.startswith("__")
                                               and v is not None})


BAD_CARS = [
    ({"class": np.array(["seven"])}, r"annotations.class must be integers"),
    ({"class": np.array([[1, 2]])}, r"annotations.class must be integers"),
    ({"class": np.array([[1.5]])}, r"annotations.class must be whole numbers"),
    ({"class": np.array([[7]])}, r"annotation 1: class is 7, outside 1..4"),
    ({"test": np.array([[2]])}, r"annotation 1: test is 2, outside 0..1"),
    ({"relative_im_path": np.array([[3.0]])}, r"annotations.relative_im_path must be text"),
    ({"relative_im_path": np.array(["../../../etc/passwd"])}, r"annotation 1: '../../../etc/passwd' is not a relative"),
    ({"relative_im_path": np.array(["car_ims/000002.jpg"])},
     r"annotation 2: image 'car_ims/000002.jpg' is listed again \(first at .*annotation 1\)"),
    ({"annotations": np.arange(4.0)}, r"annotations is not a struct vector with the fields relative_im_path"),
    ({"class_names": np.array([[1.0, 2.0]])}, r"class_names must be text"),
    ({"class_names": np.array(["A", "B", "A", "C"], dtype=object)}, r"class_names entry 3: class name 'A' is listed"),
]


@pytest.mark.parametrize("changes,message", BAD_CARS, ids=[m[:32] for _, m in BAD_CARS])
def test_cars_annotations_of_the_wrong_type_or_range(tmp_path: Path, changes: dict, message: str) -> None:
    _cars_with(tmp_path, **changes)
    with pytest.raises(FinegrainError, match=message):
        load_splits("cars196", tmp_path)


def test_cars_annotations_without_class_names(tmp_path: Path) -> None:
    _cars(tmp_path)
    content = scipy.io.loadmat(tmp_path / "cars_annos.mat")
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": content["annotations"]})
    with pytest.raises(FinegrainError, match=r"cars_annos.mat lacks the variable\(s\) class_names"):
        load_splits("cars196_retrieval", tmp_path)


def _flowers_with(root: Path, labels: object = None, **setid: object) -> None:
    ids = {"trnid": [[1, 2]], "valid": [[3, 4]], "tstid": [[5, 6, 7, 8, 9, 10]], **setid}
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3, 1]]) if labels is None
                                                 else labels})
    scipy.io.savemat(root / "setid.mat", ids)
    for i in range(1, 11):
        _put(root / "jpg" / f"image_{i:05d}.jpg", i)


BAD_FLOWERS = [
    ({"labels": np.array([[0, 2, 3, 1, 2, 3, 1, 2, 3, 1]])}, r"imagelabels.mat: label 0 of image 1 is outside 1..10"),
    ({"labels": np.array([[1, 2, 99, 1, 2, 3, 1, 2, 3, 1]])}, r"label 99 of image 3 is outside 1..10"),
    ({"labels": np.array([[1.5] * 10])}, r"labels must be whole numbers"),
    ({"labels": np.array([[np.nan] * 10])}, r"labels must be whole numbers"),
    ({"labels": np.ones((2, 5))}, r"labels must be integers \(one number or a vector\), got a ndarray of shape \(2, 5"),
    ({"labels": "roses"}, r"labels must be integers"),
    ({"tstid": [[5, 6, 7, 8, 9, 11]]}, r"setid.mat: tstid names image 11, outside 1..10"),
    ({"tstid": [[4, 5, 6, 7, 8, 9, 10]]}, r"setid.mat: image 4 is listed twice \(in valid and tstid\)"),
    ({"trnid": [[1, 1, 2]]}, r"image 1 is listed twice \(in trnid and trnid\)"),
]


@pytest.mark.parametrize("changes,message", BAD_FLOWERS, ids=[m[:32] for _, m in BAD_FLOWERS])
def test_flowers_annotations_of_the_wrong_type_or_range(tmp_path: Path, changes: dict, message: str) -> None:
    _flowers_with(tmp_path, **changes)
    with pytest.raises(FinegrainError, match=message):
        load_splits("flowers102", tmp_path)


# ---------------------------------------------------------------- decoding: true values of every mode

DEMO_PHOTO = sorted(DEMO_ROOT.glob("test/Pomegranate/*.jpg"))[0]


def _demo(mode: str = "RGB") -> np.ndarray:
    with Image.open(DEMO_PHOTO) as image:
        return np.asarray(image.convert(mode))


def _close(decoded: np.ndarray, expected: np.ndarray) -> None:
    """Within one level of 8 bits, channel by channel (grey expected: every channel)."""
    expected = np.repeat(expected[:, :, None], 3, axis=2) if expected.ndim == 2 else expected
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    assert int(np.abs(decoded.astype(int) - expected.astype(int)).max()) <= 1


def test_16_bit_grey_png_decodes_to_its_true_values_not_white(tmp_path: Path) -> None:
    grey = _demo("L")
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.9  # PIL's own conversion clips: all white
    _close(decode_rgb(str(path)), grey)
    item, _, _ = ImageDataset([Sample(str(path), 0)])[0]
    _close(item.permute(1, 2, 0).numpy(), grey)
    assert check_images([Sample(str(path), 0)], progress=False) == []


def test_high_bit_depth_files_decode_to_their_true_values(tmp_path: Path) -> None:
    grey, rgb = _demo("L"), _demo("RGB")
    wide = grey.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "rgb16.png"), (rgb.astype(np.uint16) * 257)[:, :, ::-1])  # OpenCV writes BGR
    alpha = np.full(grey.shape, 40000, np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), np.dstack([(rgb.astype(np.uint16) * 257)[:, :, ::-1], alpha]))
    cv2.imwrite(str(tmp_path / "grey16.pgm"), wide)
    Image.fromarray(wide).save(tmp_path / "grey16.tif")
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "int32_16bit_values.tif")
    Image.fromarray(grey.astype(np.int32) << 23).save(tmp_path / "int32_wide.tif")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float_0_1.tif")
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float_0_255.tif")
    Image.fromarray(rgb).quantize(64).save(tmp_path / "palette.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "grey_alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    expected = {"rgb16.png": rgb, "rgba16.png": rgb, "grey16.pgm": grey, "grey16.tif": grey,
                "int32_16bit_values.tif": grey, "int32_wide.tif": grey, "float_0_1.tif": grey,
                "float_0_255.tif": grey, "grey_alpha.png": grey, "cmyk.tif": rgb,
                "palette.png": np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))}
    for name, values in expected.items():
        _close(decode_rgb(str(tmp_path / name)), values)
    assert check_images([Sample(str(tmp_path / name), 0) for name in expected], progress=False) == []


def test_images_without_a_known_brightness_are_bad_images(tmp_path: Path) -> None:
    grey = _demo("L").astype(np.float32)
    bad = {"float_0_765.tif": grey * 3, "float_nan.tif": np.where(grey > 100, np.nan, grey).astype(np.float32),
           "negative.tif": grey.astype(np.int32) - 100}
    low, high = int(grey.min()), int(grey.max())
    messages = [rf"floating-point pixel values {3 * low}..{3 * high} are outside both 0..1 and 0..255",
                r"holds NaN or infinite", rf"has negative pixel values \(down to {low - 100}\)"]
    for (name, values), message in zip(bad.items(), messages):
        Image.fromarray(values).save(tmp_path / name)
        with pytest.raises(FinegrainError, match=message):
            decode_rgb(str(tmp_path / name))
    paths = sorted(str(tmp_path / name) for name in bad)
    assert check_images([Sample(path, 0) for path in paths], progress=False) == paths


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds only a few rows: a decompression bomb's opening."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(width + 1) * 4)) + chunk(b"IEND", b""))


def test_giant_images_are_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(40_000, 40_000))  # 1.6 gigapixels in a few hundred bytes
    with pytest.raises(FinegrainError, match=r"bomb.png is too large to decode safely .*raise "
                                             r"PIL.Image.MAX_IMAGE_PIXELS if you trust the file"):
        decode_rgb(str(bomb))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # the demo photos are 100x100
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
            FinegrainError, match=r"100x100 = 10,000 pixels, more than the limit of 6,000"):
        decode_rgb(str(DEMO_PHOTO))
    samples = [Sample(str(bomb), 0)] + [Sample(str(path), 1) for path in sorted(DEMO_ROOT.glob("test/*/*.jpg"))[:3]]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    assert check_images(samples, progress=False) == [str(bomb)]
    with pytest.warns(BadImageWarning, match=r"Skipping .*bomb.png: .*too large to decode safely"):
        _, _, index = ImageDataset(samples, max_bad_fraction=0.5)[0]
    assert index == 1


# ---------------------------------------------------------------- the kinds in the CLI's help

def test_fgvc_kind_sets_data_kind_and_helps_name_every_kind(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finegrain.cli import app
    from finegrain.cli.data import CLASSIFICATION_KINDS, OWN_TABLE, RETRIEVAL_KINDS

    assert sorted(CLASSIFICATION_KINDS + RETRIEVAL_KINDS + (OWN_TABLE,)) == kinds()
    for command in (["fgvc", "--help"], ["data", "info", "--help"]):
        text = " ".join(CliRunner().invoke(app, command, terminal_width=200).stdout.split())
        assert "folder for your own class folders (ROOT/<class>/*.jpg" in text
        assert all(kind in text for kind in CLASSIFICATION_KINDS)
    result = CliRunner().invoke(app, ["fgvc", "--recipe", "demo", "--kind", "pets", "--data", str(DEMO_ROOT),
                                      "--out", str(tmp_path / "run"), "--quiet"])
    assert isinstance(result.exception, FinegrainError)
    assert "The pets data set must be laid out as" in str(result.exception)
    assert "--kind folder, or --set data.kind=folder" in str(result.exception)
