"""Detection data (issue 27, items 1, 2 and 8): one internal form from COCO, VOC and YOLO files, the embedded
digit-canvas default, bad annotation files as one line, and COCO mAP from pycocotools."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepipe.data.canvas import digit_canvases
from edgepipe.data.detection import read_coco, read_voc, read_yolo
from edgepipe.errors import EdgepipeError
from tests.detection_files import as_dict, write_coco, write_voc, write_yolo

SHARED_BCCD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bccd"


@pytest.fixture(scope="module")
def small():
    return digit_canvases(12, "train", size=48, max_objects=3, classes=(0, 1, 2, 3), seed=3)


def test_the_canvases_are_a_detection_set_of_their_own(small) -> None:
    again = digit_canvases(12, "train", size=48, max_objects=3, classes=(0, 1, 2, 3), seed=3)
    assert [im.boxes.tolist() for im in small.images] == [im.boxes.tolist() for im in again.images]  # seeded
    assert small.class_names == ["0", "1", "2", "3"] and small.num_boxes == small.counts["boxes"] >= 12
    for im in small.images:
        assert im.pixels.shape == (48, 48, 3) and im.pixels.dtype == np.uint8
        b = im.boxes
        assert ((b[:, 0] >= 0) & (b[:, 2] <= 48) & (b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all()
        assert set(im.labels.tolist()) <= {0, 1, 2, 3}
        for x1, y1, x2, y2 in b.astype(int):  # the box is the glyph's ink: bright inside, not all background
            assert im.pixels[y1:y2, x1:x2].max() > 120
    val = digit_canvases(4, "val", size=48, classes=(0, 1, 2, 3), seed=3)
    assert not np.array_equal(val.images[0].pixels, small.images[0].pixels)


def test_coco_voc_and_yolo_files_of_one_set_read_the_same(small, tmp_path: Path) -> None:
    annotations, images = write_coco(small, tmp_path / "coco")
    coco = read_coco(annotations, images)
    voc = read_voc(write_voc(small, tmp_path / "voc"), "train", class_names=small.class_names)
    yolo = read_yolo(write_yolo(small, tmp_path / "yolo"), "train")
    want = as_dict(small)
    for got in (coco, voc, yolo):
        assert got.class_names == small.class_names
        assert got.counts["images"] == len(small.images) and got.counts["boxes"] == small.num_boxes
        have = as_dict(got)
        assert sorted(have) == sorted(want), got.source
        for key, (boxes, labels) in want.items():
            np.testing.assert_allclose(have[key][0], boxes, atol=1e-3, err_msg=f"{got.source} {key}")
            assert have[key][1].tolist() == labels.tolist(), (got.source, key)
            assert have[key][1].dtype == np.int64 and have[key][0].dtype == np.float32


def test_voc_without_a_class_list_takes_the_sorted_names(small, tmp_path: Path) -> None:
    voc = read_voc(write_voc(small, tmp_path / "voc"), "train")
    assert voc.class_names == sorted({small.class_names[c] for im in small.images for c in im.labels})


def test_boxes_outside_without_area_and_images_without_boxes_are_fixed_and_counted(tmp_path: Path,
                                                                                   caplog) -> None:
    root = write_voc(digit_canvases(2, size=32, max_objects=1, classes=(0, 1), seed=0), tmp_path / "voc")
    xml = sorted((root / "Annotations").glob("*.xml"))
    xml[0].write_text(xml[0].read_text().replace(
        "</annotation>", "<object><name>0</name><bndbox><xmin>-5</xmin><ymin>2</ymin><xmax>10</xmax><ymax>40</ymax>"
                         "</bndbox></object><object><name>1</name><bndbox><xmin>7</xmin><ymin>3</ymin><xmax>7</xmax>"
                         "<ymax>9</ymax></bndbox></object></annotation>"))
    text = xml[1].read_text()
    xml[1].write_text(text[:text.index("<object>")] + "</annotation>")  # no boxes: background
    split = read_voc(root, "train", class_names=["0", "1"])
    assert split.counts["clipped"] == 1 and split.counts["degenerate"] == 1 and split.counts["background"] == 1
    first = next(im for im in split.images if im.image_id == xml[0].stem)
    assert [0.0, 2.0, 10.0, 32.0] in first.boxes.tolist()
    assert "1 box(es) clipped to their image, 1 box(es) without area skipped" in caplog.text


def test_a_missing_or_damaged_image_is_skipped_and_counted_or_stops_with_strict(small, tmp_path: Path) -> None:
    annotations, images = write_coco(small, tmp_path / "coco")
    names = sorted(images.iterdir())
    names[0].unlink()
    names[1].write_bytes(b"not an image")
    split = read_coco(annotations, images)
    assert split.counts["unreadable"] == 2 and len(split.images) == len(small.images) - 2
    with pytest.raises(EdgepipeError, match=rf"{names[0].name}: image missing; restore or remove it"):
        read_coco(annotations, images, strict=True)


@pytest.mark.parametrize("form, damage, message", [
    ("coco", lambda r: (r / "instances.json").write_text("{not json"), r"instances.json: not a readable COCO JSON"),
    ("coco", lambda r: (r / "instances.json").write_text('{"images": []}'), r"needs lists 'images', 'annotations'"),
    ("coco", lambda r: (r / "instances.json").write_text((r / "instances.json").read_text().replace(
        '"category_id": 1', '"category_id": 9', 1)), r"annotation \d+ \(image \d+\): category_id 9 is not in the file's"),
    ("voc", lambda r: next((r / "Annotations").glob("*.xml")).write_text("<annotation><object>"),
     r"\.xml: not well-formed XML"),
    ("voc", lambda r: next((r / "Annotations").glob("*.xml")).write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>"), r"\.xml: class 'cat' is not one of the 4 classes \(0, 1, 2, 3\)"),
    ("voc", lambda r: next((r / "Annotations").glob("*.xml")).write_text(
        "<annotation><object><name>0</name><bndbox><xmin>one</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>"), r"object 1 <xmin>: 'one' is not a number"),
    ("voc", lambda r: (r / "ImageSets" / "Main" / "train.txt").unlink(), r"train.txt: split list not found"),
    ("yolo", lambda r: next((r / "labels" / "train").glob("*.txt")).write_text("7 0.5 0.5 0.1 0.1\n"),
     r"\.txt: line 1: class 7 is not an index of the 4 class names"),
    ("yolo", lambda r: next((r / "labels" / "train").glob("*.txt")).write_text("0 0.5 0.5 0.1\n"),
     r"\.txt: line 1: expected 'class cx cy w h' \(5 numbers\), got 4"),
    ("yolo", lambda r: next((r / "labels" / "train").glob("*.txt")).write_text("0 0.5 nan 0.1 0.1\n"),
     r"\.txt: a box coordinate is not a finite number"),
    ("yolo", lambda r: (r / "data.yaml").write_text("nc: 4\n"), r"data.yaml: needs 'names'"),
])
def test_a_bad_annotation_file_is_one_line_naming_it(small, tmp_path: Path, form, damage, message) -> None:
    if form == "coco":
        root = tmp_path / "coco"
        write_coco(small, root)
        damage(root)
        read = lambda: read_coco(root / "instances.json", root / "images")  # noqa: E731
    elif form == "voc":
        root = write_voc(small, tmp_path / "voc")
        damage(root)
        read = lambda: read_voc(root, "train", class_names=small.class_names)  # noqa: E731
    else:
        root = write_yolo(small, tmp_path / "yolo")
        damage(root)
        read = lambda: read_yolo(root, "train")  # noqa: E731
    with pytest.raises(EdgepipeError, match=message) as err:
        read()
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not SHARED_BCCD.is_dir(), reason="needs ../shared/datasets/bccd")
def test_bccd_reads_as_its_readme_says() -> None:
    """BCCD (VOC): 205 / 72 train / test images, RBC, WBC and Platelets, and its two degenerate boxes skipped."""
    splits = {s: read_voc(SHARED_BCCD, s, class_names=["Platelets", "RBC", "WBC"]) for s in ("train", "val", "test")}
    assert [len(splits[s].images) for s in ("train", "val", "test")] == [205, 87, 72]
    assert sum(s.counts["degenerate"] for s in splits.values()) == 2
    assert sum(s.counts["boxes"] for s in splits.values()) + 2 == 4888


def test_coco_map_from_pycocotools() -> None:
    """Perfect detections score 1; a class never detected scores 0 and halves the mean; boxes off by half miss
    at IoU .5."""
    from edgepipe.tasks.detection_metrics import coco_scores

    truth = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.array([0, 1])),
             (np.array([[5, 5, 25, 25]], np.float32), np.array([0]))]
    perfect = [(b, np.ones(len(b)), c) for b, c in truth]
    s = coco_scores(truth, perfect, ["a", "b"])
    assert s["map"] == pytest.approx(1.0) and s["map50"] == pytest.approx(1.0)
    assert s["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    only_a = [(b[c == 0], np.ones(int((c == 0).sum())), c[c == 0]) for b, c in truth]
    s = coco_scores(truth, only_a, ["a", "b"])
    assert s["per_class"]["b"] == 0.0 and s["map"] == pytest.approx(0.5)
    shifted = [(b + np.array([5, 5, 5, 5], np.float32) * (b[:, 2:3] - b[:, 0:1]) / 10, np.ones(len(b)), c)
               for b, c in truth]
    assert coco_scores(truth, shifted, ["a", "b"])["map50"] < 0.5
    assert coco_scores(truth, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * 2, ["a", "b"])["map"] == 0.0


def test_a_bad_detection_set_stops_the_command_before_the_run_folder_is_written(small, tmp_path: Path,
                                                                                capsys) -> None:
    """Through the CLI: a malformed annotation file is one line, exit 2, and no run folder is made (the detection
    loader runs in preflight, before anything is written)."""
    import json as _json

    from edgepipe.cli import main
    from tests.test_detection_task import _config

    root = write_voc(small, tmp_path / "voc", name="train")
    write_voc(small, tmp_path / "voc", name="test")
    bad = next((root / "Annotations").glob("*.xml"))
    bad.write_text("<annotation><object>")
    config = _config(kind="voc", path=str(root), image_size=48)
    config["teacher"]["model"]["kwargs"]["num_classes"] = 4
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_json.dumps(config))
    run = tmp_path / "run"
    assert main(["teacher", "--config", str(cfg), "--target", "generic-cpu", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: not well-formed XML" in err[0]
    assert not (run / "manifest.json").exists()
