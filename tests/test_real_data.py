"""Checks against the real Kermany data in ../shared/data (skipped where absent)."""

import collections
import csv

from pneumoscope.data.layouts import load_dataset
from pneumoscope.data.records import CLASS_NAMES
from pneumoscope.data.splits import check_leakage, scan, split_by_patient


def test_inspect_matches_manifest(real_data):
    manifest = list(csv.DictReader(open(real_data / "MANIFEST.csv")))
    ds = scan(load_dataset(real_data), workers=4)
    assert ds.layout == "kaggle" and not ds.problems
    ours = collections.Counter((r.origin_split, CLASS_NAMES[r.label]) for r in ds.records)
    theirs = collections.Counter((m["split"], m["label"]) for m in manifest)
    assert ours == theirs
    by_name = {(r.origin_split, r.ref.rsplit("/", 1)[-1]): r for r in ds.records}
    for m in manifest:
        r = by_name[(m["split"], m["filename"])]
        assert r.patient_id.split("/", 1)[1] == m["patient_id"], m["filename"]
        assert r.pneumonia_type == m["pneumonia_type"]
        assert r.content_hash == m["stored_sha256"]


def test_real_split_has_no_patient_leakage(real_data):
    ds = scan(load_dataset(real_data), check_decode=False)
    records = split_by_patient(ds.records, seed=0)
    report = check_leakage(records)
    assert report["patients_in_several_splits"] == []
    assert report["duplicates_across_splits"] == []
    counts = collections.Counter(r.split for r in records)
    assert counts["test"] == 312 and counts["train"] + counts["val"] == 5232
    val_patients = {r.patient_id for r in records if r.split == "val"}
    assert 0.08 < len(val_patients) / (2846 + 15) < 0.12
