import zipfile

import numpy as np
import pytest

from pneumoscope.data.folders import walk_files
from pneumoscope.data.layouts import load_dataset
from pneumoscope.data.records import CLASS_NAMES, Record, parse_patient_id
from pneumoscope.data.splits import check_leakage, limit_per_split, scan, split_by_patient, summarize
from pneumoscope.errors import DataError


@pytest.mark.parametrize(
    "name,label,expected",
    [
        ("person12_bacteria_45.jpeg", 1, ("person12", "bacteria", True)),
        ("person1946_virus_4874.jpeg", 1, ("person1946", "virus", True)),
        ("person447_virus_921_1.jpeg", 1, ("person447", "virus", True)),
        ("IM-0115-0001.jpeg", 0, ("IM-0115", "none", True)),
        ("NORMAL2-IM-0374-0001-0002.jpeg", 0, ("NORMAL2-IM-0374", "none", True)),
        ("scan_0007.png", 1, ("scan_0007", "unknown", False)),
    ],
)
def test_parse_patient_id(name, label, expected):
    pid = parse_patient_id(name, label)
    assert (pid.patient_id, pid.pneumonia_type, pid.from_name) == expected


def test_kaggle_layout_namespaces_test_patients(kaggle_tree):
    ds = load_dataset(kaggle_tree)
    assert ds.layout == "kaggle"
    test_ids = {r.patient_id for r in ds.records if r.split == "test"}
    train_ids = {r.patient_id for r in ds.records if r.split in ("train", "val")}
    assert all(p.startswith("test/") for p in test_ids)
    assert "test/person0" in test_ids and "train/person0" in train_ids  # same number, different patients


def test_class_folder_names_are_case_insensitive(tmp_path, kaggle_tree):
    (kaggle_tree / "train" / "NORMAL").rename(kaggle_tree / "train" / "normal")
    ds = load_dataset(kaggle_tree / "train")
    assert ds.layout == "class-folders"
    assert {r.label for r in ds.records} == {0, 1}


def test_zip_of_kaggle_root_matches_folder(tmp_path, kaggle_tree):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in kaggle_tree.rglob("*.jpeg"):
            zf.write(f, "chest_xray/" + f.relative_to(kaggle_tree).as_posix())
    folder, zipped = load_dataset(kaggle_tree), load_dataset(archive)
    assert [(r.label, r.split, r.patient_id) for r in folder.records] == [(r.label, r.split, r.patient_id) for r in zipped.records]
    image = zipped.reader.read_image(zipped.records[0].ref)
    assert image.ndim == 2


def test_npz_uses_medmnist_split(tmp_path):
    from tests.conftest import make_npz

    arrays = make_npz(tmp_path / "p.npz", (("train", 10), ("val", 4), ("test", 4)))
    ds = load_dataset(tmp_path / "p.npz")
    assert ds.layout == "npz" and not ds.has_patient_ids
    assert [sum(r.split == s for r in ds.records) for s in ("train", "val", "test")] == [10, 4, 4]
    img = ds.reader.read_image(ds.records[3].ref)
    np.testing.assert_allclose(img, arrays["train_images"][3] / 255.0, atol=1e-6)


def test_missing_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match="NORMAL/ and PNEUMONIA/"):
        load_dataset(tmp_path / "empty")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope")


def test_walk_follows_links_but_not_round_a_cycle(tmp_path, caplog):
    import logging

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"b")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"a")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)  # a cycle of one
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # not a cycle: followed
    (root / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # the same folder twice: no cycle, walked once
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        files = walk_files(root)
    assert sorted(str(f.relative_to(root)) for f in files) == ["again/b.png", "sub/a.png"]  # by the first path, sorted (issue 23)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(root / "sub" / "up") in warned and str(root / "sub" / "self") in warned and "linked" not in warned


def test_scan_skips_and_lists_bad_files(kaggle_tree):
    bad = kaggle_tree / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"")
    text = kaggle_tree / "train" / "PNEUMONIA" / "person9999_virus_1.jpeg"
    text.write_text("<html>not an image</html>")
    ds = scan(load_dataset(kaggle_tree))
    problems = dict(ds.problems)
    assert set(problems) == {str(bad), str(text)}
    assert "empty" in problems[str(bad)] and "not a readable image" in problems[str(text)]
    assert all(r.content_hash for r in ds.records)


def test_no_patient_in_two_splits(kaggle_tree):
    ds = load_dataset(kaggle_tree)
    records = split_by_patient(ds.records, val_fraction=0.25, seed=3)
    splits_of = {}
    for r in records:
        splits_of.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r.split for r in records} == {"train", "val", "test"}
    val_labels = {r.label for r in records if r.split == "val"}
    assert val_labels == {0, 1}  # stratified


def test_split_is_seeded():
    records = [Record(f"{i}.png", i % 2, "train", f"train/p{i // 3}", "none", True) for i in range(300)]
    a = split_by_patient(records, seed=1)
    b = split_by_patient(records, seed=1)
    c = split_by_patient(records, seed=2)
    assert [r.split for r in a] == [r.split for r in b] != [r.split for r in c]
    n_val_patients = len({r.patient_id for r in a if r.split == "val"})
    assert 8 <= n_val_patients <= 12  # 10% of 100 patients, per class rounding


def test_leakage_check_flags_crossing_patients_and_duplicates():
    rows = [
        Record("a", 1, "train", "train/p1", "virus", True, content_hash="h1"),
        Record("b", 1, "val", "train/p1", "virus", True, content_hash="h2"),
        Record("c", 0, "test", "test/p2", "none", True, content_hash="h1"),
    ]
    report = check_leakage(rows)
    assert report["patients_in_several_splits"] == ["train/p1"]
    assert report["duplicate_groups"] == 1 and len(report["duplicates_across_splits"]) == 1
    assert not report["ok"]


def test_limit_per_split_keeps_both_classes():
    records = [Record(f"{i}", int(i < 10), "train", f"p{i}", "none", True) for i in range(100)]
    kept = limit_per_split(records, 20)
    assert len(kept) == 20 and {r.label for r in kept} == {0, 1}


@pytest.mark.slow
def test_pack_writes_a_zip_that_train_reads_with_the_same_records(kaggle_tree, tmp_path):
    import zipfile

    from pneumoscope.cli.main import main
    from pneumoscope.data.decode import read_image

    (kaggle_tree / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"not a jpeg")
    packed = tmp_path / "packed.zip"
    assert main(["-q", "pack", str(kaggle_tree), "--out", str(packed), "--size", "48"]) == 1  # one unreadable file left out
    src, out = load_dataset(kaggle_tree), load_dataset(packed)
    key = lambda r: (r.split, r.label, r.patient_id)  # noqa: E731
    assert sorted(map(key, out.records)) == sorted(map(key, [r for r in src.records if "9999" not in r.ref]))
    with zipfile.ZipFile(packed) as zf:
        first = out.records[0]
        assert max(read_image(first.ref, zf.read(first.ref)).shape) == 48
    assert main(["-q", "pack", str(kaggle_tree), "--out", str(packed)]) == 2  # never replaced silently
    small = tmp_path / "same.zip"
    assert main(["-q", "pack", str(kaggle_tree), "--out", str(small), "--size", "64"]) == 1
    with zipfile.ZipFile(small) as zf:  # images no larger than --size are stored byte for byte
        name = next(n for n in zf.namelist() if n.endswith(".jpeg"))
        assert zf.read(name) == (kaggle_tree / name).read_bytes()
    run = tmp_path / "run"
    assert main(["-q", "train", str(packed), "--out", str(run), "--pretrained", "none", "--epochs", "2", "--val-fraction", "0.3"]) == 0


def test_pack_keeps_two_files_that_differ_only_by_suffix(kaggle_tree, tmp_path):
    from PIL import Image

    from pneumoscope.cli.main import main

    folder = kaggle_tree / "train" / "NORMAL"
    jpeg = next(folder.glob("*.jpeg"))
    Image.open(jpeg).save(jpeg.with_suffix(".png"))  # a.png beside a.jpeg, both resized on packing
    packed = tmp_path / "packed.zip"
    assert main(["-q", "pack", str(kaggle_tree), "--out", str(packed), "--size", "32"]) == 0
    with zipfile.ZipFile(packed) as zf:
        names = zf.namelist()
    assert len(names) == len(set(names))  # no entry written twice under one name
    assert len(load_dataset(packed).records) == len(load_dataset(kaggle_tree).records)


def _zip_with_a_bomb(tree, archive):
    """``tree``'s images, and train/NORMAL/zbomb.png: 5 MB of zeros (a bomb under the 1 MiB bound the tests set)."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(tree.rglob("*.jpeg")):
            zf.write(f, f.relative_to(tree).as_posix())
        with zf.open("train/NORMAL/zbomb.png", "w") as fh:
            fh.write(bytes(5 << 20))
    return archive


def test_data_inspect_and_pack_skip_a_zip_bomb_member_with_the_reason_and_read_the_rest(kaggle_tree, tmp_path, monkeypatch, capsys):
    import json

    import pneumoscope.data.bounded
    from pneumoscope.cli.main import main

    monkeypatch.setattr(pneumoscope.data.bounded, "MAX_MEMBER_BYTES", 1 << 20)
    archive = _zip_with_a_bomb(kaggle_tree, tmp_path / "bomb.zip")
    images = len(load_dataset(kaggle_tree).records)
    assert main(["-q", "data", "inspect", str(archive), "--json"]) == 1  # done, one file unreadable
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == images
    assert [row["path"] for row in summary["unreadable"]] == [f"{archive}::train/NORMAL/zbomb.png"]
    assert "declares 5,242,880 bytes uncompressed, over the limit of 1,048,576 (possible zip bomb)" in summary["unreadable"][0]["reason"]
    packed = tmp_path / "packed.zip"
    assert main(["-q", "pack", str(archive), "--out", str(packed), "--size", "64"]) == 1
    with zipfile.ZipFile(packed) as zf:
        assert not [n for n in zf.namelist() if "zbomb" in n]
    assert len(load_dataset(packed).records) == images


def _spy_scandir(monkeypatch) -> list[int]:
    """Entries read through os.scandir (the bounded look), and a failure if anything walks the tree."""
    import os

    read, scandir = [], os.scandir

    class Counted:
        def __init__(self, path):
            self.it = scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for entry in self.it:
                read.append(1)
                yield entry

    monkeypatch.setattr(os, "scandir", Counted)
    monkeypatch.setattr(
        "pneumoscope.data.layouts.walk_files", lambda root: pytest.fail(f"{root} was walked before its class folders were found")
    )
    return read


def test_a_folder_without_class_folders_is_refused_after_a_bounded_look_naming_what_it_found(tmp_path, monkeypatch):
    """Issue 20: `data inspect` on a wrong parent folder (no class folders) scanned recursively for over 5 minutes."""
    root = tmp_path / "parent"
    (root / "a" / "b" / "c" / "d" / "NORMAL").mkdir(parents=True)  # too deep to be a dataset's class folder
    (root / "a" / "b" / "c" / "d" / "NORMAL" / "x.png").write_bytes(b"x")
    for name in ("b", "c", ".hidden", "__MACOSX"):
        (root / name).mkdir()
    (root / "notes.txt").write_text("not a folder")
    read = _spy_scandir(monkeypatch)
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(err.value) == (
        f"{root}: no NORMAL/ and PNEUMONIA/ class folders (any case) within 3 levels (found: a/, b/, c/). Fix: point at "
        "the chest_xray folder that holds train/ val/ test/, or at a folder holding NORMAL/ and PNEUMONIA/"
    )
    assert len(read) < 20


def test_the_look_for_class_folders_reads_a_bounded_number_of_entries(tmp_path, monkeypatch):
    root = tmp_path / "wide"
    for i in range(40):
        for j in range(40):
            (root / f"f{i:02d}" / f"g{j:02d}").mkdir(parents=True)
    monkeypatch.setattr("pneumoscope.data.folders.LOOK_ENTRIES", 300)
    read = _spy_scandir(monkeypatch)
    with pytest.raises(DataError, match=r"found: f00/, f01/, f02/, f03/, f04/ and 35 more; the look stopped after 300 entries\)"):
        load_dataset(root)
    assert len(read) <= 300 + 40  # the budget, then the top folder listed again for the message


@pytest.mark.parametrize("where", ["", "train", "chest_xray/train", "site/b"])
def test_class_folders_are_still_found_up_to_three_levels_down(tmp_path, where):
    from PIL import Image

    root = tmp_path / "root"
    for c in ("Normal", "PNEUMONIA"):
        (root / where / c).mkdir(parents=True)
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(root / where / c / f"person1_{c}_1.png")
    ds = load_dataset(root)
    assert sorted(r.label for r in ds.records) == [0, 1] and ds.layout == ("kaggle" if where.endswith("train") else "class-folders")


# --------------------------------------------------------------------------- issue 22: any folder-labelled task


def test_classes_auto_takes_every_class_folder_sorted_as_keras_does(tmp_path):
    from tests.conftest import make_three_class_tree

    tree = make_three_class_tree(tmp_path / "cx", n_patients=2, per_patient=1)
    ds = load_dataset(tree, classes="auto")
    assert ds.class_names == ("COVID", "NORMAL", "PNEUMONIA") and ds.layout == "kaggle"
    assert {ds.class_names[r.label] for r in ds.records} == {"COVID", "NORMAL", "PNEUMONIA"}
    assert all(ds.class_names[r.label].lower() in r.ref.lower() for r in ds.records)
    summary = summarize(ds)
    assert summary["classes"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert summary["splits"]["train"]["classes"] == {"COVID": 2, "NORMAL": 2, "PNEUMONIA": 2}
    assert summary["splits"]["train"]["patients_per_class"] == {"COVID": 2, "NORMAL": 2, "PNEUMONIA": 2}
    # an order given: labels follow it; the default task ignores COVID/ as before, with a warning
    ordered = load_dataset(tree, classes=["normal", "pneumonia", "covid"])
    assert ordered.class_names == ("normal", "pneumonia", "covid")
    assert {ordered.class_names[r.label].upper() for r in ordered.records} == {"COVID", "NORMAL", "PNEUMONIA"}
    default = load_dataset(tree)
    assert default.class_names == CLASS_NAMES and default.unknown_classes == ["COVID"]
    assert "classes" not in summarize(default)  # the default task's summary reads as before
    from pneumoscope.data.splits import DatasetSummary, SplitCounts
    from tests.conftest import conforms

    for s in (summary, summarize(default)):
        conforms(s, DatasetSummary)
        for counts in s["splits"].values():
            conforms(counts, SplitCounts)


def test_pneumonia_type_labels_come_from_kermany_file_names(kaggle_tree):
    ds = load_dataset(kaggle_tree, labels="pneumonia-type")
    assert ds.class_names == ("NORMAL", "BACTERIA", "VIRUS")
    for r in ds.records:
        name = r.ref.rsplit("/", 1)[-1]
        assert ds.class_names[r.label] == ("BACTERIA" if "_bacteria_" in name else "VIRUS" if "_virus_" in name else "NORMAL")
    (kaggle_tree / "train" / "PNEUMONIA" / "untyped-scan.jpeg").write_bytes(
        (kaggle_tree / "train" / "NORMAL").glob("*.jpeg").__next__().read_bytes()
    )
    again = load_dataset(kaggle_tree, labels="pneumonia-type")
    assert [p for p, why in again.problems if "names no type" in why] == [str(kaggle_tree / "train" / "PNEUMONIA" / "untyped-scan.jpeg")]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes": ["NORMAL"]}, "two or more"),
        ({"classes": ["a", "A"]}, "two or more different"),
        ({"classes": [1, 2]}, "classes must be auto or folder names"),  # a YAML list of numbers: one line, not a traceback
        ({"classes": {"a": 1}}, "classes must be auto or folder names"),
        ({"labels": "colour"}, "labels must be one of"),
        ({"labels": "pneumonia-type", "classes": ["X", "Y"]}, "pneumonia-type makes the classes"),
    ],
)
def test_a_bad_class_request_is_one_clear_error(kaggle_tree, kwargs, match):
    from pneumoscope.errors import UsageError

    with pytest.raises(UsageError, match=match):
        load_dataset(kaggle_tree, **kwargs)


def test_an_npz_holds_the_default_task_only(tmp_path):
    from tests.conftest import make_npz

    make_npz(tmp_path / "p.npz")
    with pytest.raises(DataError, match="NORMAL vs PNEUMONIA only"):
        load_dataset(tmp_path / "p.npz", labels="pneumonia-type")


def _spy_renames(monkeypatch) -> list[str]:
    """The names of the files :func:`pneumoscope.outputs.atomic_file` renames into place."""
    import os
    from pathlib import Path

    from pneumoscope import outputs

    seen, replace = [], os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: seen.append(Path(src).name) or replace(src, dst))
    return seen


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_pack_stages_under_the_one_atomic_writer_and_follows_the_umask(umask, kaggle_tree, tmp_path, monkeypatch):
    import os

    from pneumoscope.data.pack import pack_dataset
    from pneumoscope.outputs import partial_name

    out = tmp_path / "out" / "packed.zip"
    renamed = _spy_renames(monkeypatch)
    old = os.umask(umask)
    try:
        pack_dataset(kaggle_tree, out, size=32, progress=False)
    finally:
        os.umask(old)
    assert len(renamed) == 1 and renamed[0].startswith(partial_name(out))
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask and os.listdir(out.parent) == ["packed.zip"]


def test_pack_on_a_full_disk_names_the_zip_and_leaves_nothing(kaggle_tree, tmp_path, monkeypatch):
    """Before issue 21 the error named no file (zipfile's write has none to name)."""
    import errno
    import os

    from pneumoscope.data.pack import pack_dataset

    def full(self, name, data, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    out = tmp_path / "out" / "packed.zip"
    with pytest.raises(OSError) as err:
        pack_dataset(kaggle_tree, out, size=32, progress=False)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out)
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("unreadable", [0, 1])
def test_image_cache_follows_the_umask_and_leaves_no_temporary_file_on_failure(unreadable, kaggle_tree, tmp_path, monkeypatch):
    """Before issue 21 the cached array kept mkstemp's 0600 whatever the umask (unless compacted, one unreadable image)."""
    import os

    from pneumoscope.data import imagecache
    from pneumoscope.data.preprocessing import Preprocessing

    ds = scan(load_dataset(kaggle_tree))
    bad = Record("train/NORMAL/IM-8888-0001.jpeg", 0, "train", "train/IM-8888", "none", True, content_hash="f" * 64)
    (kaggle_tree / bad.ref).write_bytes(b"\xff\xd8\xff broken")
    records, pre = ds.records[:4] + [bad] * unreadable, Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    from pneumoscope.data.loading import RecordImages

    broken = RecordImages.__getitem__
    monkeypatch.setattr(RecordImages, "__getitem__", lambda self, i: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        imagecache.build_image_array(ds, records, pre, tmp_path, num_workers=0, progress=False)
    assert os.listdir(tmp_path / "images") == []
    monkeypatch.setattr(RecordImages, "__getitem__", broken)
    old = os.umask(0o022)
    try:
        arr = imagecache.build_image_array(ds, records, pre, tmp_path, num_workers=0, progress=False)  # compacted when one is left out
    finally:
        os.umask(old)
    assert arr.images.shape == (4, 32, 32)
    files = sorted((tmp_path / "images").iterdir())
    assert [f.suffix for f in files] == [".json", ".npy"]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)


def _recorded_skips(recorder: str, kaggle_tree, tmp_path) -> dict[str, str]:
    """What ``recorder`` writes beside each image it skips."""
    from pneumoscope.data.imagecache import _Resized
    from pneumoscope.data.loading import RecordImages
    from pneumoscope.data.pack import pack_dataset
    from pneumoscope.data.preprocessing import Preprocessing
    from pneumoscope.models.features import _Preprocessed

    ds = load_dataset(kaggle_tree)
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if recorder == "pack":
        return {row["path"]: row["reason"] for row in pack_dataset(kaggle_tree, tmp_path / "p.zip", progress=False)["skipped"]}
    loader = RecordImages(ds, ds.records, {"features": _Preprocessed, "imagecache": _Resized}[recorder](pre), pre.input_size)
    return {ds.display(ds.records[i]): row[-1] for i, *row in (loader[i] for i in range(len(ds.records))) if row[-1]}


@pytest.mark.parametrize("recorder", ["features", "imagecache", "pack"])
def test_a_skipped_image_is_recorded_with_the_reason_and_the_fix(recorder, kaggle_tree, tmp_path):
    """Issue 21: these kept only ``err.reason``, so skipped.csv lost the fix the error gives."""
    from pneumoscope.data.decode import read_image
    from pneumoscope.errors import ImageReadError

    empty = kaggle_tree / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    empty.write_bytes(b"")
    text = kaggle_tree / "train" / "PNEUMONIA" / "person9999_virus_1.jpeg"
    text.write_text("<html>not an image</html>")
    expected = {}
    for path in (empty, text):
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        expected[str(path)] = f"{err.value.reason}. {err.value.fix}"
    assert _recorded_skips(recorder, kaggle_tree, tmp_path) == expected
    assert expected[str(empty)] == "file is empty (0 bytes). Re-copy or remove the file."


def test_skip_detail_is_the_reason_and_fix_or_the_message_of_another_error():
    from pneumoscope.data.decode import skip_detail
    from pneumoscope.errors import ImageReadError

    assert skip_detail(ImageReadError("a.png", "file is empty (0 bytes)", "Re-copy it.")) == "file is empty (0 bytes). Re-copy it."
    assert skip_detail(KeyError("member")) == "'member'"


def test_an_npz_image_is_converted_once_and_checked_like_any_other(tmp_path, monkeypatch):
    """Issue 21: NpzReader scaled and converted by itself and skipped the check every decoder's output passes."""
    from pneumoscope.data.decode import to_image
    from pneumoscope.errors import ImageReadError

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    colour = rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    nan = rng.uniform(size=(3, 28, 28))
    nan[1, 4, 4] = np.nan
    labels = np.zeros((3, 1), np.uint8)
    for name, images in (("gray", gray), ("colour", colour), ("nan", nan)):
        np.savez(tmp_path / f"{name}.npz", train_images=images, train_labels=labels)
    calls = []
    monkeypatch.setattr("pneumoscope.data.readers.to_image", lambda x, name, **kw: calls.append(name) or to_image(x, name, **kw))
    for name, images in (("gray", gray), ("colour", colour)):
        ds = load_dataset(tmp_path / f"{name}.npz")
        calls.clear()
        img = ds.reader.read_image("train/1")
        assert calls == [ds.reader.display("train/1")] and img.dtype == np.float32
        assert np.array_equal(img, to_image(images[1]))  # colour as a decoded colour file (Pillow's convert("L"))
    ds = load_dataset(tmp_path / "nan.npz")
    np.testing.assert_allclose(ds.reader.read_image("train/0"), nan[0], atol=1e-7)
    with pytest.raises(ImageReadError, match="NaN or infinite") as err:
        ds.reader.read_image("train/1")  # before: NaN pixels went on to the network
    assert err.value.path == f"{tmp_path / 'nan.npz'}::train/1"
    assert [p for p, _ in scan(ds).problems] == [f"{tmp_path / 'nan.npz'}::train/1"]
