"""finegrain.data on the shipped demo images and on small fakes of the public data sets' native
layouts (split files written in their own formats, images copied from the demo)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from finegrain.data import DEMO_ROOT, BadImageWarning, ImageDataset, Sample, check_images, demo_root, load_splits
from finegrain.errors import FinegrainError
from finegrain.preprocessing import IMAGENET, RELEASE, Preprocessing

DEMO_JPEGS = sorted(DEMO_ROOT.glob("train/*/*.jpg"))


def _put(path: Path, index: int = 0) -> None:
    """A real JPEG (a copied demo photo) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEMO_JPEGS[index % len(DEMO_JPEGS)], path)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- demo data and folder layouts

def test_demo_is_shipped_with_licence_and_the_promised_split() -> None:
    assert demo_root() == DEMO_ROOT
    assert "MIT License" in (DEMO_ROOT / "LICENSE").read_text()
    assert "Oltean" in (DEMO_ROOT / "LICENSE").read_text() and "a0cdad5e" in (DEMO_ROOT / "ATTRIBUTION.md").read_text()
    splits = load_splits("folder", DEMO_ROOT)
    train, test = splits["train"], splits["test"]
    assert len(train.classes) == 16 and train.classes == test.classes == sorted(train.classes)
    wanted = {"Granny Smith", "Lemon", "Orange", "Strawberry", "Pomegranate", "Braeburn", "Golden 1", "Apple Red 2"}
    assert wanted <= set(train.classes)
    assert np.bincount(train.labels).tolist() == [24] * 16 and np.bincount(test.labels).tolist() == [10] * 16
    assert not {s.path for s in train.samples} & {s.path for s in test.samples}
    assert all(Path(s.path).parent.name == train.classes[s.label] for s in train.samples + test.samples)
    with Image.open(train.samples[0].path) as image:
        assert image.format == "JPEG" and image.size == (100, 100)


def test_single_folder_is_split_per_class_by_a_seeded_fraction(tmp_path: Path) -> None:
    for c, name in enumerate(["b_class", "a_class", "c_class"]):
        for i in range(10):
            _put(tmp_path / name / f"{i}.jpg", c * 10 + i)
    first = load_splits("folder", tmp_path, test_fraction=0.2, seed=3)
    assert first["train"].classes == ["a_class", "b_class", "c_class"]
    assert np.bincount(first["test"].labels).tolist() == [2, 2, 2] and len(first["train"]) == 24
    assert not {s.path for s in first["train"].samples} & {s.path for s in first["test"].samples}
    assert load_splits("folder", tmp_path, test_fraction=0.2, seed=3) == first
    assert load_splits("folder", tmp_path, test_fraction=0.2, seed=4)["test"] != first["test"]


def test_zero_shot_folder_splits_classes_not_images() -> None:
    halves = load_splits("folder_zeroshot", DEMO_ROOT)
    train, test = halves["train"], halves["test"]
    assert not set(train.classes) & set(test.classes)
    assert train.classes + test.classes == sorted(train.classes + test.classes) and len(train.classes) == 8
    assert len(train) == len(test) == 8 * 34  # train/ and test/ images pooled per class
    for split in (train, test):
        assert sorted(set(split.labels)) == list(range(len(split.classes)))
    seeded = load_splits("folder_zeroshot", DEMO_ROOT, test_fraction=0.25, seed=1)
    assert len(seeded["test"].classes) == 4 and not set(seeded["train"].classes) & set(seeded["test"].classes)
    assert load_splits("folder_zeroshot", DEMO_ROOT, test_fraction=0.25, seed=1) == seeded


# ---------------------------------------------------------------- fakes of the public data sets

def _food101(root: Path) -> None:
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    lists = {"train": [f"{c}/{100 + i}" for c in classes for i in range(3)],
             "test": [f"{c}/{200 + i}" for c in classes for i in range(2)]}
    _write(root / "meta" / "classes.txt", classes)
    for name, lines in lists.items():
        _write(root / "meta" / f"{name}.txt", lines)
    for n, line in enumerate(lists["train"] + lists["test"]):
        _put(root / "images" / f"{line}.jpg", n)


CAR_CLASSES = [(1, 0), (1, 1), (2, 0), (2, 1), (2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (4, 0)]  # (class, test flag)


def _cars(root: Path) -> None:
    fields = [("bbox_x1", "O"), ("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    annotations = np.zeros((1, len(CAR_CLASSES)), dtype=fields)
    for i, (class_id, test) in enumerate(CAR_CLASSES):
        path = np.array([f"car_ims/{i + 1:06d}.jpg"])
        annotations[0, i] = (np.array([[5]]), path, np.array([[class_id]], np.uint8), np.array([[test]], np.uint8))
        _put(root / "car_ims" / f"{i + 1:06d}.jpg", i)
    names = np.empty((1, 4), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008"]
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})


def _flowers(root: Path) -> None:
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3, 1]], np.uint8)})
    scipy.io.savemat(root / "setid.mat", {"trnid": [[1, 2]], "valid": [[3, 4]], "tstid": [[5, 6, 7, 8, 9, 10]]})
    for i in range(1, 11):
        _put(root / "jpg" / f"image_{i:05d}.jpg", i)


def _aircraft(root: Path) -> None:
    data = root / "data"
    _write(data / "variants.txt", ["707-320", "Cessna 172", "F-16A/B"])
    _write(data / "images_variant_trainval.txt",
           ["0034309 707-320", "0034958 Cessna 172", "0037511 F-16A/B", "0037512 Cessna 172"])
    _write(data / "images_variant_test.txt", ["1514522 F-16A/B", "1514523 707-320", "1514524 Cessna 172"])
    for n, image in enumerate(["0034309", "0034958", "0037511", "0037512", "1514522", "1514523", "1514524"]):
        _put(data / "images" / f"{image}.jpg", n)


PETS = {"trainval": ["Abyssinian_100 1 1 1", "american_bulldog_10 2 2 1", "Bengal_12 3 1 2", "Abyssinian_101 1 1 1"],
        "test": ["Abyssinian_1 1 1 1", "american_bulldog_11 2 2 1", "Bengal_3 3 1 2"]}


def _pets(root: Path) -> None:
    for name, rows in PETS.items():
        _write(root / "annotations" / f"{name}.txt", ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", *rows])
        for n, row in enumerate(rows):
            _put(root / "images" / f"{row.split()[0]}.jpg", n)


def _sop(root: Path) -> None:
    header = "image_id class_id super_class_id path"
    train = [f"{i + 1} {c} 1 bicycle_final/{c}_{i}.JPG" for i, c in enumerate([1, 1, 2, 2, 3, 3, 3])]
    test = [f"{i + 1} {c} 2 cabinet_final/{c}_{i}.JPG" for i, c in enumerate([4, 4, 5, 5])]
    _write(root / "Ebay_train.txt", [header, *train])
    _write(root / "Ebay_test.txt", [header, *test])
    for n, row in enumerate(train + test):
        _put(root / row.split()[3], n)


def _cub(root: Path) -> None:
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
    _write(root / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(classes)])
    images = [(c, f"{classes[c - 1]}/{classes[c - 1][4:]}_{k}.jpg") for c in (1, 2, 3, 4) for k in range(c + 1)]
    _write(root / "images.txt", [f"{i + 1} {path}" for i, (_, path) in enumerate(images)])
    _write(root / "image_class_labels.txt", [f"{i + 1} {c}" for i, (c, _) in enumerate(images)])
    for n, (_, path) in enumerate(images):
        _put(root / "images" / path, n)


# kind, builder, train size, test size, train classes, test classes
PUBLIC = [
    ("food101", _food101, 9, 6, 3, 3),
    ("cars196", _cars, 6, 4, 4, 4),
    ("cars196_retrieval", _cars, 5, 5, 2, 2),
    ("flowers102", _flowers, 4, 6, 3, 3),
    ("aircraft", _aircraft, 4, 3, 3, 3),
    ("pets", _pets, 4, 3, 3, 3),
    ("sop", _sop, 7, 4, 3, 2),
    ("cub200", _cub, 5, 9, 2, 2),
]


@pytest.mark.parametrize("kind,build,n_train,n_test,c_train,c_test", PUBLIC, ids=[row[0] for row in PUBLIC])
def test_public_readers_on_native_layouts(tmp_path: Path, kind, build, n_train, n_test, c_train, c_test) -> None:
    build(tmp_path)
    splits = load_splits(kind, tmp_path)
    assert (len(splits["train"]), len(splits["test"])) == (n_train, n_test)
    assert (len(splits["train"].classes), len(splits["test"].classes)) == (c_train, c_test)
    for split in splits.values():
        assert sorted(set(split.labels)) == list(range(len(split.classes)))  # every class used, labels 0..k-1
        assert all(Path(sample.path).is_file() for sample in split.samples)
    zero_shot = kind in {"cars196_retrieval", "sop", "cub200"}
    shared = set(splits["train"].classes) & set(splits["test"].classes)
    assert (not shared) if zero_shot else splits["train"].classes == splits["test"].classes


def test_official_label_conventions(tmp_path: Path) -> None:
    """Pets and Cars: label = id - 1; CUB: first half of the class ids train; Aircraft: variants.txt order."""
    _pets(tmp_path / "pets")
    pets = load_splits("pets", tmp_path / "pets")["train"]
    for sample, row in zip(pets.samples, PETS["trainval"]):
        name, class_id = row.split()[:2]
        assert sample.label == int(class_id) - 1 and Path(sample.path).stem == name
        assert pets.classes[sample.label] == name.rsplit("_", 1)[0]
    _cars(tmp_path / "cars")
    cars = load_splits("cars196", tmp_path / "cars")
    assert [s.label + 1 for s in cars["test"].samples] == [c for c, test in CAR_CLASSES if test]
    retrieval = load_splits("cars196_retrieval", tmp_path / "cars")
    assert retrieval["test"].classes == ["Acura TL Sedan 2012", "Acura TL Type-S 2008"]
    _cub(tmp_path / "cub")
    assert load_splits("cub200", tmp_path / "cub")["test"].classes == ["003.Sooty_Albatross", "004.Groove_billed_Ani"]
    _aircraft(tmp_path / "air")
    aircraft = load_splits("aircraft", tmp_path / "air")["train"]
    assert aircraft.classes == ["707-320", "Cessna 172", "F-16A/B"] and aircraft.labels == [0, 1, 2, 1]


# ---------------------------------------------------------------- bad layouts: one clear message each

def _empty_class(root: Path) -> None:
    _put(root / "train" / "a" / "1.jpg")
    (root / "train" / "b").mkdir()
    _put(root / "test" / "a" / "2.jpg")


def _unknown_test_class(root: Path) -> None:
    _put(root / "train" / "a" / "1.jpg")
    _put(root / "test" / "zebra" / "2.jpg")


def _missing_image(root: Path) -> None:
    _food101(root)
    (root / "images" / "baklava" / "201.jpg").unlink()


def _nested(root: Path) -> None:
    _sop(root / "Stanford_Online_Products")


def _bad_mat(root: Path) -> None:
    (root / "cars_annos.mat").write_bytes(b"not a matlab file at all" * 10)


BAD_LAYOUTS = [
    ("folder", lambda root: None, {}, r"holds no class folders"),
    ("folder", _empty_class, {}, r"Class folder .*b holds no images"),
    ("folder", lambda root: _put(root / "train" / "a" / "1.jpg"), {}, r"has a train/ folder but no test/"),
    ("folder", _unknown_test_class, {}, r"class folders missing from .*train: zebra"),
    ("folder", lambda root: _put(root / "a" / "1.jpg"), {"test_fraction": 1.5}, r"test_fraction must be between 0 and"),
    ("folder", lambda root: None, {"fraction": 0.1}, r"Unknown option\(s\) fraction for data kind 'folder'"),
    ("folder_zeroshot", lambda root: _put(root / "only" / "1.jpg"), {}, r"needs at least 2"),
    ("food101", lambda root: None, {}, r"Missing .*meta/train.txt. The food101 data set must be laid out as: ROOT/"),
    ("food101", _missing_image, {}, r"1 image\(s\) listed in .*test.txt are missing, e.g. .*baklava/201.jpg"),
    ("food101", lambda root: _food101(root) or _write(root / "meta" / "test.txt", []), {}, r"test split of .* holds"),
    ("sop", _nested, {}, r"Missing .*Ebay_train.txt.*Products/Ebay_train.txt exists: pass --data .*Online_Products"),
    ("cars196", _bad_mat, {}, r"Cannot read .*cars_annos.mat as a MATLAB file"),
    ("pets", lambda root: [_write(root / "annotations" / f"{n}.txt", ["x_1 one 1 1"]) for n in ("trainval", "test")],
     {}, r"trainval.txt, line 1 \('x_1 one 1 1'\): CLASS-ID must be a whole number"),
]


@pytest.mark.parametrize("kind,build,opts,message", BAD_LAYOUTS, ids=[f"{row[0]}-{row[3][:24]}" for row in BAD_LAYOUTS])
def test_bad_layouts_get_one_clear_error(tmp_path: Path, kind, build, opts, message) -> None:
    build(tmp_path)
    with pytest.raises(FinegrainError, match=message):
        load_splits(kind, tmp_path, **opts)


def test_unknown_kind_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FinegrainError, match=r"Unknown data set kind 'imagenet'. Use one of: aircraft, cars196, .*sop"):
        load_splits("imagenet", tmp_path)
    with pytest.raises(FinegrainError, match=r"Data folder .*nowhere does not exist.*laid out as: ROOT/train/<class>"):
        load_splits("folder", tmp_path / "nowhere")


# ---------------------------------------------------------------- decoding and bad images

def _with_corrupt(tmp_path: Path, good: int, bad: int) -> list[Sample]:
    samples = [Sample(str(path), i) for i, path in enumerate(DEMO_JPEGS[:good])]
    for k in range(bad):
        broken = tmp_path / f"broken_{k}.jpg"
        data = DEMO_JPEGS[k].read_bytes()
        broken.write_bytes(data[: len(data) // 2])  # a truncated JPEG: valid header, missing scan data
        samples.insert(1 + 2 * k, Sample(str(broken), 99))
    return samples


def test_corrupt_jpeg_is_skipped_counted_and_warned(tmp_path: Path) -> None:
    samples = _with_corrupt(tmp_path, good=150, bad=1)
    dataset = ImageDataset(samples, transform=None)
    with pytest.warns(BadImageWarning, match=r"Skipping .*broken_0.jpg"):
        image, label, index = dataset[1]
    assert (index, label) == (2, samples[2].label) and image.shape == (3, 100, 100) and image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy(np.array(Image.open(samples[2].path).convert("RGB"))).permute(2, 0, 1))
    assert dataset.bad_count == 1 and dataset.bad_paths == [samples[1].path]
    assert check_images(samples, progress=False) == [samples[1].path]


def test_bad_counts_from_workers_reach_the_main_process(tmp_path: Path) -> None:
    samples = _with_corrupt(tmp_path, good=150, bad=1)
    dataset = ImageDataset(samples, transform=None)
    loader = DataLoader(dataset, batch_size=16, num_workers=2)
    batches = list(loader)
    assert sum(len(labels) for _, labels, _ in batches) == len(samples)  # batches stay full
    assert dataset.bad_count == 1


def test_too_many_bad_images_is_an_error(tmp_path: Path) -> None:
    dataset = ImageDataset(_with_corrupt(tmp_path, good=20, bad=3), transform=None, max_bad_fraction=0.05)
    with pytest.warns(BadImageWarning), pytest.raises(FinegrainError, match=r"2 of 4 images read so far cannot be"):
        for i in range(len(dataset)):
            dataset[i]


# ---------------------------------------------------------------- transforms

def _lemon() -> np.ndarray:
    return np.asarray(Image.open(sorted(DEMO_ROOT.glob("test/Lemon/*.jpg"))[0]).convert("RGB"))


@pytest.mark.parametrize("columns", [slice(None), slice(10, 70)], ids=["square", "portrait"])
def test_eval_transform_is_resize_short_side_centre_crop_normalise(columns: slice) -> None:
    from finegrain.data.transforms import eval_transform

    image = np.ascontiguousarray(_lemon()[:, columns])
    height, width = image.shape[:2]
    scale = 256 / min(height, width)
    size = (round(width * scale), round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
    top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
    crop = resized[top:top + 224, left:left + 224]
    expected = (crop - np.array(IMAGENET.mean, np.float32)) / np.array(IMAGENET.std, np.float32)
    out = eval_transform(IMAGENET)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    tolerance = 1.0 / np.array(IMAGENET.std, np.float32) + 1e-4  # one grey level of resampling difference
    assert (np.abs(out.permute(1, 2, 0).numpy() - expected) <= tolerance).all()


def test_normalisation_uses_the_given_mean_and_std() -> None:
    from finegrain.data.transforms import eval_transform, retrieval_eval_transform

    image = _lemon()
    release = eval_transform(RELEASE)(image)
    assert -123.68 <= release.min() < -100 and 100 < release.max() <= 255 - 103.94  # std 1: roughly [-124, 152]
    imagenet = eval_transform(IMAGENET)(image)

    def to_pixels(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
        return x * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)

    assert torch.allclose(to_pixels(imagenet, IMAGENET), to_pixels(release, RELEASE), atol=1e-3)
    portrait = np.ascontiguousarray(image[:, 20:80])
    flat = retrieval_eval_transform(Preprocessing(mean=(0, 0, 0), std=(1, 1, 1)), size=160)(portrait)
    expected = np.asarray(Image.fromarray(portrait).resize((160, 160), Image.BILINEAR), np.float32)
    assert flat.shape == (3, 160, 160) and np.abs(flat.permute(1, 2, 0).numpy() - expected).max() <= 1  # aspect ignored


def test_train_transforms_follow_torch_rng_so_workers_differ_and_runs_repeat() -> None:
    from finegrain.data.transforms import retrieval_train_transform, train_transform

    image = _lemon()
    transforms = [train_transform(IMAGENET, "cifar10"), train_transform(IMAGENET, "imagenet"),
                  retrieval_train_transform(IMAGENET)]
    for transform in transforms:
        worker_copy = pickle.loads(pickle.dumps(transform))  # what a DataLoader worker gets
        torch.manual_seed(0)
        first = transform(image)
        torch.manual_seed(0)
        assert torch.equal(worker_copy(image), first)
        torch.manual_seed(1)
        assert not torch.equal(worker_copy(image), first)
        assert first.shape == (3, 224, 224) and first.dtype == torch.float32


def test_train_crop_covers_the_paper_scale_range() -> None:
    """Random resized crop of 5-100% of the area: on a half-black image the black share varies widely."""
    from finegrain.data.transforms import train_transform

    image = np.zeros((200, 200, 3), np.uint8)
    image[:, 100:] = 255
    transform = train_transform(Preprocessing(mean=(0, 0, 0), std=(255, 255, 255), train_size=32))
    torch.manual_seed(0)
    white = [float(transform(image).mean()) for _ in range(200)]
    assert min(white) == 0.0 and max(white) == 1.0 and 0.3 < np.mean(white) < 0.7  # small crops fall on one side


def test_unknown_autoaugment_policy() -> None:
    from finegrain.data.transforms import train_transform

    with pytest.raises(FinegrainError, match=r"Unknown AutoAugment policy 'svhn'. Use one of: imagenet, cifar10"):
        train_transform(IMAGENET, "svhn")


# ---------------------------------------------------------------- samplers

def test_epoch_batches_depend_only_on_seed_and_epoch_and_replay_from_any_batch() -> None:
    from finegrain.data.samplers import EpochBatches

    batches = EpochBatches(20, batch_size=4, seed=11)
    batches.set_epoch(3)
    epoch = list(batches)
    assert len(epoch) == len(batches) == batches.steps_per_epoch == 5
    assert sorted(sum(epoch, [])) == list(range(20))
    again = EpochBatches(20, batch_size=4, seed=11)
    again.set_epoch(3, skip=2)
    assert list(again) == epoch[2:] and len(again) == 3
    again.set_epoch(4)
    assert list(again) != epoch
    with pytest.raises(FinegrainError, match="Cannot resume at batch 6"):
        again.set_epoch(3, skip=6)


def test_paired_batches_carry_an_independent_second_order() -> None:
    from finegrain.data.samplers import EpochBatches

    single, paired = EpochBatches(20, 4, seed=11), EpochBatches(20, 4, seed=11, paired=True)
    for sampler in (single, paired):
        sampler.set_epoch(3)
    pairs = list(paired)
    assert [batch[:4] for batch in pairs] == list(single)  # the first halves are the unpaired order
    firsts, seconds = sum((b[:4] for b in pairs), []), sum((b[4:] for b in pairs), [])
    assert sorted(firsts) == sorted(seconds) == list(range(20)) and firsts != seconds
    paired.set_epoch(3, skip=2)
    assert list(paired) == pairs[2:]


def test_m_per_class_batches_hold_m_images_per_class() -> None:
    from finegrain.data.samplers import MPerClassBatchSampler

    split = load_splits("folder", DEMO_ROOT)["train"]
    sampler = MPerClassBatchSampler(split, m=4, batch_size=16, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(split) // 16
    for batch in batches:
        counts = np.bincount([split.samples[i].label for i in batch])
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4, 4]
    assert list(MPerClassBatchSampler(split, m=4, batch_size=16, seed=0)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(FinegrainError, match="must divide the batch size"):
        MPerClassBatchSampler(split, m=3, batch_size=16, seed=0)
    with pytest.raises(FinegrainError, match="needs 32 classes; the split has 16"):
        MPerClassBatchSampler(split, m=2, batch_size=64, seed=0)


# ---------------------------------------------------------------- the `data info` command

def test_data_info_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finegrain.cli.data import app, data_info

    info = data_info("folder", DEMO_ROOT)
    assert (info["train"], info["test"], info["classes"]) == (384, 160, 16)
    result = CliRunner().invoke(app, ["info", "--kind", "folder", "--data", str(DEMO_ROOT), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["train"] == 384
    _food101(tmp_path)
    text = CliRunner().invoke(app, ["info", "--kind", "food101", "--data", str(tmp_path), "--check-images"])
    assert "train: 9 images, 3 classes" in text.stdout and "undecodable images: 0" in text.stdout
    failed = CliRunner().invoke(app, ["info", "--data", str(tmp_path)])
    assert isinstance(failed.exception, FinegrainError) and "Pass --kind" in str(failed.exception)
