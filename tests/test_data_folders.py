"""Folder loaders on tiny fixtures: metadata.csv folders, Stanford Dogs' layout, X-ray class folders."""

import numpy as np
import pytest
from PIL import Image

from hf_isnet.data.folders import (
    box_mask,
    load_image_mask_folder,
    load_stanford_dogs,
    load_xray_folder,
)

SIZE = 16


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def square_mask(top: int, left: int, side: int = 4, size=(SIZE, SIZE)) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[top : top + side, left : left + side] = 255
    return mask


def decode(dataset, column, index):
    return np.asarray(dataset[index][column])


# --------------------------------------------------------------------------------------- metadata.csv
@pytest.fixture
def csv_folder(tmp_path):
    rows = ["file_name,mask_file_name,label,extra"]
    for i, label in enumerate(["dog", "cat", "dog"]):
        write_png(tmp_path / "images" / f"{i}.png", np.full((SIZE, SIZE, 3), 10 * i))
        write_png(tmp_path / "masks" / f"{i}.png", square_mask(i, i))
        rows.append(f"images/{i}.png,masks/{i}.png,{label},x")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_metadata_folder_round_trip(csv_folder):
    dataset = load_image_mask_folder(csv_folder)
    assert dataset.column_names == ["image", "mask", "label"]
    assert dataset.features["label"].names == ["cat", "dog"]
    assert dataset["label"] == [1, 0, 1]
    for i in range(3):
        np.testing.assert_array_equal(decode(dataset, "image", i), np.full((SIZE, SIZE, 3), 10 * i))
        np.testing.assert_array_equal(decode(dataset, "mask", i), square_mask(i, i))
    fixed = load_image_mask_folder(csv_folder, label_names=["dog", "cat", "bird"])
    assert fixed["label"] == [0, 1, 0] and fixed.features["label"].num_classes == 3


def test_metadata_folder_split(csv_folder):
    split = csv_folder / "train"
    split.mkdir()
    (split / "metadata.csv").write_text(
        "file_name,mask_file_name,label\n../images/0.png,../masks/0.png,dog\n"
    )
    assert load_image_mask_folder(csv_folder, split="train").num_rows == 1
    with pytest.raises(FileNotFoundError, match="test"):
        load_image_mask_folder(csv_folder, split="test")


def test_metadata_folder_errors(csv_folder, tmp_path_factory):
    with pytest.raises(ValueError, match="not in label_names"):
        load_image_mask_folder(csv_folder, label_names=["dog"])
    (csv_folder / "masks" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 files listed .*masks/1.png"):
        load_image_mask_folder(csv_folder)
    write_png(csv_folder / "masks" / "1.png", square_mask(0, 0, size=(SIZE, SIZE + 1)))
    with pytest.raises(ValueError, match=r"mask .*1.png is \(17, 16\)"):
        load_image_mask_folder(csv_folder)
    (csv_folder / "metadata.csv").write_text("file_name,label\nimages/0.png,dog\n")
    with pytest.raises(ValueError, match=r"lacks columns \['mask_file_name'\]"):
        load_image_mask_folder(csv_folder)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        load_image_mask_folder(empty)


# -------------------------------------------------------------------------------------- Stanford Dogs
BOXES = {
    "n02085620-Chihuahua/n02085620_1": [(2, 3, 9, 12)],
    "n02085620-Chihuahua/n02085620_2": [(0, 0, 3, 3), (10, 8, 30, 40)],  # two dogs, one past the edge
    "n02085782-Japanese_spaniel/n02085782_7": [(5, 5, 5, 5)],
}


def annotation_xml(boxes) -> str:
    objects = "".join(
        f"<object><name>dog</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    return f"<annotation><size><width>{SIZE}</width><height>{SIZE}</height></size>{objects}</annotation>"


@pytest.fixture
def dogs(tmp_path):
    for rel, boxes in BOXES.items():
        write_png(tmp_path / "Images" / f"{rel}.jpg", np.zeros((SIZE, SIZE, 3)))  # a black JPEG
        (tmp_path / "Annotation" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "Annotation" / rel).write_text(annotation_xml(boxes))
    (tmp_path / "Images" / "n02086240-Shih-Tzu").mkdir()  # a breed with no images in this fixture
    return tmp_path


def test_stanford_dogs_box_masks(dogs):
    dataset = load_stanford_dogs(dogs)
    assert dataset.features["label"].names == ["Chihuahua", "Japanese_spaniel", "Shih-Tzu"]
    assert dataset["label"] == [0, 0, 1]
    want = np.zeros((SIZE, SIZE), dtype=np.uint8)
    want[3:13, 2:10] = 255  # rows ymin..ymax, columns xmin..xmax, both inclusive
    np.testing.assert_array_equal(decode(dataset, "mask", 0), want)
    want = np.zeros((SIZE, SIZE), dtype=np.uint8)
    want[0:4, 0:4] = 255
    want[8:, 10:] = 255  # clipped to the image
    np.testing.assert_array_equal(decode(dataset, "mask", 1), want)
    assert decode(dataset, "mask", 2).sum() == 255 and decode(dataset, "mask", 2)[5, 5] == 255


def test_box_mask_is_the_union_of_rectangles():
    mask = box_mask([(1, 1, 2, 2), (2, 2, 4, 3)], size=(6, 5))
    assert mask.shape == (5, 6)
    assert (mask > 0).sum() == 4 + 6 - 1


def test_stanford_dogs_with_mask_folder_and_split(dogs, tmp_path_factory):
    from scipy.io import savemat

    masks_dir = tmp_path_factory.mktemp("dog_masks")
    for i, rel in enumerate(BOXES):
        write_png(masks_dir / f"{rel}.png", square_mask(i, i))
    dataset = load_stanford_dogs(dogs, masks_dir=masks_dir)
    for i in range(3):
        np.testing.assert_array_equal(decode(dataset, "mask", i), square_mask(i, i))
    savemat(
        dogs / "test_list.mat",
        {"file_list": np.array([["n02085782-Japanese_spaniel/n02085782_7.jpg"]], dtype=object)},
    )
    test = load_stanford_dogs(dogs, split="test")
    assert test.num_rows == 1 and test["label"] == [1]
    assert test.features["label"].names == dataset.features["label"].names
    with pytest.raises(FileNotFoundError, match="train_list.mat"):
        load_stanford_dogs(dogs, split="train")


def test_stanford_dogs_errors(dogs, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="masks not found"):
        load_stanford_dogs(dogs, masks_dir=tmp_path_factory.mktemp("no_masks"))
    (dogs / "Annotation" / "n02085620-Chihuahua" / "n02085620_2").unlink()
    with pytest.raises(FileNotFoundError, match="1 annotations not found.*annotation.tar"):
        load_stanford_dogs(dogs)
    (dogs / "Annotation" / "n02085620-Chihuahua" / "n02085620_2").write_text("<annotation></annotation>")
    with pytest.raises(ValueError, match="no <object><bndbox>"):
        load_stanford_dogs(dogs)
    with pytest.raises(FileNotFoundError, match="Images/"):
        load_stanford_dogs(tmp_path_factory.mktemp("not_dogs"))


# ----------------------------------------------------------------------------------------------- X-rays
@pytest.fixture
def xrays(tmp_path):
    for label, count in (("normal", 2), ("covid", 1)):
        for i in range(count):
            write_png(
                tmp_path / "train" / label / "images" / f"{label}_{i}.png", np.full((SIZE, SIZE), 50 + i)
            )
            write_png(tmp_path / "train" / label / "masks" / f"{label}_{i}.png", square_mask(i, 2 * i))
    return tmp_path


def test_xray_class_folders(xrays):
    dataset = load_xray_folder(xrays, split="train")
    assert dataset.features["label"].names == ["covid", "normal"]
    assert dataset["label"] == [0, 1, 1]
    np.testing.assert_array_equal(decode(dataset, "image", 2), np.full((SIZE, SIZE), 51))
    np.testing.assert_array_equal(decode(dataset, "mask", 2), square_mask(1, 2))


def test_xray_masks_may_be_png_for_jpeg_images(xrays):
    image = xrays / "train" / "covid" / "images" / "covid_0.png"
    image.rename(image.with_suffix(".jpg"))
    assert load_xray_folder(xrays, split="train").num_rows == 3


def test_xray_metadata_csv_is_used_when_present(csv_folder):
    assert load_xray_folder(csv_folder).features["label"].names == ["cat", "dog"]


def test_xray_errors(xrays):
    (xrays / "train" / "normal" / "masks" / "normal_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 masks not found: .*normal_1.png"):
        load_xray_folder(xrays, split="train")
    (xrays / "train" / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="images/ and masks/"):
        load_xray_folder(xrays, split="train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_xray_folder(xrays, split="val")
