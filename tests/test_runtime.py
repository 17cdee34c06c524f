"""Process settings (issue 19): CPUs the process can get, progress that is never silent, workers that die with their parent,
and a command line that starts without importing torch."""

import logging
import os
import subprocess
import sys
import time

import numpy as np

from pneumoscope import runtime
from pneumoscope.evaluation.figures import pick_cases
from pneumoscope.explain.checks import MIN_FAITHFULNESS_IMAGES
from tests.conftest import process_tree, survivors


def test_available_cpus_follows_the_affinity_mask_and_the_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(runtime, "_cgroup_cpu_quota", lambda: None)
    assert runtime.available_cpus() == 4
    monkeypatch.setattr(runtime, "_cgroup_cpu_quota", lambda: 1.5)  # cpu.max "150000 100000"
    assert runtime.available_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3
    assert runtime.available_cpus() == 1


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert runtime._cgroup_cpu_quota(str(tmp_path)) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime._cgroup_cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime._cgroup_cpu_quota(str(tmp_path)) == 0.5
    assert runtime._cgroup_cpu_quota(str(tmp_path / "absent")) is None


def test_thread_settings_are_set_before_torch_starts_and_the_users_win():
    code = (
        "import os; from pneumoscope.runtime import configure_cpu_threads; n = configure_cpu_threads(); import torch; "
        "print(n, os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] == out[3] == str(runtime.available_cpus()) and out[2] == "PASSIVE"
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1", "ACTIVE", "1"]


def test_progress_off_a_terminal_is_a_log_line_every_ten_seconds_with_the_time_left(caplog):
    now = [0.0]
    bar = runtime._LogProgress(None, total=100, desc="features", unit="img", enabled=True, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="pneumoscope"):
        for _ in range(10):  # 10 images a second for 10 s
            now[0] += 1.0
            bar.update(10 if now[0] <= 5 else 0)
        bar.set_postfix(val_loss="0.1234")
        now[0] += 0.5
        bar.update(0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["features: 50/100 img after 10 s (5.0 img/s), about 10 s left"], lines
    assert "50/100" in bar.line(now[0]) and "val_loss=0.1234" in bar.line(now[0])
    quiet = runtime._LogProgress(range(3), total=None, desc="x", unit="it", enabled=False, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="pneumoscope"):
        caplog.clear()
        for _ in quiet:
            now[0] += 20
    assert caplog.records == [] and quiet.n == 3


def test_progress_bar_is_tqdm_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(runtime.progress_bar(total=3, desc="x"), runtime._LogProgress)
    assert list(runtime.progress_bar(range(3), desc="x")) == [0, 1, 2]


def test_a_worker_dies_with_its_parent_even_after_kill_9(tmp_path):
    """The parent starts a child that arms die_with_parent, then sleeps; the parent is killed with SIGKILL."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, time\n"
        "from pneumoscope.runtime import die_with_parent\n"
        "def child():\n    die_with_parent()\n    time.sleep(600)\n"
        "if __name__ == '__main__':\n    mp.get_context('fork').Process(target=child).start()\n    print('started', flush=True)\n    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        time.sleep(0.3)  # the child arms the signal first thing; give it the moment
        started = process_tree(parent.pid)
        assert started
    finally:
        parent.kill()
        parent.wait()
    assert survivors(started) == []


def test_building_the_parser_imports_neither_torch_nor_grad_cam():
    """`pneumoscope --help` and `--version` answer at once: choices come from light modules (benchmarks/bench_startup.py times it)."""
    code = (
        "import sys; from pneumoscope.cli.parser import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'pytorch_grad_cam', 'sklearn', 'timm', 'lightning', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    for argv in (["--help"], ["--version"], ["train", "--help"], ["explain", "--help"]):
        done = subprocess.run([sys.executable, "-m", "pneumoscope", *argv], capture_output=True, text=True)
        assert done.returncode == 0 and ("usage" in done.stdout or "pneumoscope" in done.stdout), argv


def test_pick_cases_shows_both_classes_right_and_wrong_and_enough_for_the_faithfulness_check():
    y_true = np.array([0] * 50 + [1] * 50)
    y_prob = np.r_[np.linspace(0.0, 0.6, 50), np.linspace(0.3, 1.0, 50)]  # threshold 0.5: some of each outcome
    picks = pick_cases(y_true, y_prob, 0.5, per_kind=2, at_least=MIN_FAITHFULNESS_IMAGES)
    kinds = [k for k, _ in picks]
    assert {"true positive", "true negative", "false positive", "false negative"} <= set(kinds) and len(picks) == 8
    assert len({i for _, i in picks}) == len(picks)
    fp = [i for k, i in picks if k == "false positive"]
    assert y_prob[fp[0]] == y_prob[y_true == 0].max()  # the most confident mistake first
    # the demo's case: every image of one class (all NORMAL first), none wrong: still at least five, both classes where they exist
    y_true, y_prob = np.array([0] * 6 + [1] * 6), np.r_[np.full(6, 0.1), np.full(6, 0.9)]
    picks = pick_cases(y_true, y_prob, 0.5, per_kind=2, at_least=MIN_FAITHFULNESS_IMAGES)
    assert len(picks) == MIN_FAITHFULNESS_IMAGES and {k for k, _ in picks} == {"true positive", "true negative"}
    assert len(pick_cases(y_true[:3], y_prob[:3], 0.5, at_least=5)) == 3  # as many as there are


def test_a_malformed_dicom_header_is_one_row_not_pydicoms_warning_with_its_source_line(tmp_path):
    """pydicom's UserWarning ("Invalid value for VR IS: 'x'", then its source line) reached the terminal under -q, beside
    the skipped row that already names the value and the fix; -v still shows it."""
    import subprocess
    import sys

    from tests.dicom_util import write_malformed_dicoms

    folder = tmp_path / "NORMAL"
    write_malformed_dicoms(folder)
    for flag, shown in (("-q", False), ("-v", True)):
        proc = subprocess.run(
            [sys.executable, "-m", "pneumoscope", "data", "inspect", str(tmp_path), flag], capture_output=True, text=True, timeout=120
        )
        assert "frames_x.dcm" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
        assert ("UserWarning" in proc.stderr) is shown, proc.stderr


def test_pick_cases_picks_only_images_with_a_diagnosis():
    """explain maps only what predict gives a diagnosis: the demo picked images the OOD guard flagged, explain left them
    out, and fewer than the faithfulness check needs were explained."""
    y_true = np.array([0] * 6 + [1] * 6)
    y_prob = np.r_[np.linspace(0.0, 0.3, 6), np.linspace(0.7, 1.0, 6)]
    eligible = np.ones(12, dtype=bool)
    eligible[[0, 1, 11]] = False  # the most confident of two kinds are not assessable
    picks = pick_cases(y_true, y_prob, 0.5, per_kind=2, at_least=MIN_FAITHFULNESS_IMAGES, eligible=eligible)
    assert len(picks) == MIN_FAITHFULNESS_IMAGES and all(eligible[i] for _, i in picks)
    assert [i for k, i in picks if k == "true negative"][0] == 2 and [i for k, i in picks if k == "true positive"][0] == 10


def test_an_evaluation_knows_which_images_predict_would_not_assess():
    from pneumoscope.evaluation.scoring import EvaluationResult

    result = EvaluationResult(
        records=[None] * 4,
        paths=["a", "b", "c", "d"],
        y_true=np.zeros(4),
        y_prob=np.zeros(4),
        metrics={},
        problems=[],
        ood_distance=np.array([1.0, 9.0, np.nan, 2.0]),
        screened=["", "", "", "image is near-constant"],
    )
    assert result.assessable(5.0).tolist() == [True, False, True, False]
    assert result.assessable(None).tolist() == [True, True, True, False]


def test_the_gallery_and_the_demo_replace_a_case_the_image_screen_flags():
    """Without --tta the evaluation does not screen the images: a blank one could be picked, and explain would leave it
    out. The picked images are screened and a flagged one replaced by the next case."""
    from types import SimpleNamespace

    from pneumoscope.errors import ImageReadError
    from pneumoscope.evaluation.figures import pick_diagnosed_cases
    from pneumoscope.evaluation.scoring import EvaluationResult

    y_true = np.array([0] * 6 + [1] * 6)
    y_prob = np.r_[np.linspace(0.0, 0.3, 6), np.linspace(0.7, 1.0, 6)]
    result = EvaluationResult([None] * 12, [f"{i}.png" for i in range(12)], y_true, y_prob, {}, [])
    rng = np.random.default_rng(0)

    def image_of(i):
        if i == 11:
            raise ImageReadError(f"{i}.png", "gone", "Check the file.")
        return np.full((64, 64), 0.5, np.float32) if i == 0 else rng.uniform(size=(64, 64)).astype(np.float32)

    predictor = SimpleNamespace(threshold=0.5, ood_cutoff=None)
    cases, images = pick_diagnosed_cases(predictor, result, image_of, per_kind=2, at_least=MIN_FAITHFULNESS_IMAGES)
    picked = [i for _, i in cases]
    assert 0 not in picked and 11 not in picked and len(picked) == MIN_FAITHFULNESS_IMAGES and set(images) == set(picked)
    assert [i for k, i in cases if k == "true negative"][:2] == [1, 2] and [i for k, i in cases if k == "true positive"][:2] == [10, 9]


def test_explains_summary_says_n_a_for_a_figure_the_checks_could_not_compute():
    """Every map empty or constant: summarize_checks gives None, and `explain` ended in a TypeError formatting it."""
    from pneumoscope.cli.commands import _checks_lines

    summary = dict.fromkeys(
        [
            "mean_road_most",
            "mean_road_least",
            "mean_road_random",
            "mean_sanity_spearman",
            "mean_delta_border_masked",
            "mean_delta_centre_masked",
            "mean_cam_outside_centre",
        ]
    )
    text = _checks_lines({**summary, "remove_percent": 20, "faithfulness_verdict": "too few images", "mean_road_most": 0.25}, "PNEUMONIA")
    assert "+0.250 for the most" in text and "mean Spearman n/a" in text and "CAM mass outside the centre n/a" in text
