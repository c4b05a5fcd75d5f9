"""The benchmark script's bookkeeping: rerunning some models keeps the others' results; the folder rows."""

import json
import re

import pytest

from helpers import ROOT

from benchmarks import folder
from benchmarks import readme
from benchmarks import report
from benchmarks import run


def test_rerunning_one_model_keeps_the_others_rows_skips_dates_and_order():
    earlier, now = {"date": "2026-11-30", "commit": "aaa"}, {"date": "2026-12-01", "commit": "bbb"}
    previous = {"measured": earlier, "skipped": {"resnet50": "too slow to compile"},
                "rows": [{"model": name, "jit_compile": False} for name in ("cnn", "airbench", "resnet50")]}
    measured = {"measured": now, "skipped": {}, "rows": [{"model": "cnn", "jit_compile": False},
                                                          {"model": "cnn", "jit_compile": True}]}
    merged = run.merge_throughput(previous, measured, ["cnn"])
    assert [(row["model"], row["jit_compile"]) for row in merged["rows"]] == [
        ("cnn", False), ("cnn", True), ("airbench", False), ("resnet50", False)]
    assert [row["measured"] for row in merged["rows"]] == [now, now, earlier, earlier]
    assert merged["skipped"] == {"resnet50": "too slow to compile"} and merged["measured"] == now


def test_a_rerun_model_replaces_its_old_rows_and_skip():
    previous = {"measured": {"date": "old"}, "skipped": {"resnet50": "old reason"},
                "rows": [{"model": "resnet50", "jit_compile": False, "real": 1.0}]}
    measured = {"measured": {"date": "new"}, "skipped": {"resnet50": "new reason"},
                "rows": [{"model": "resnet50", "jit_compile": False, "real": 2.0}]}
    merged = run.merge_throughput(previous, measured, ["resnet50"])
    assert [row["real"] for row in merged["rows"]] == [2.0] and merged["skipped"] == {"resnet50": "new reason"}


def test_a_readme_block_is_replaced_between_its_own_markers_only(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("top\n<!-- a:start -->\nold a\n<!-- a:end -->\n<!-- b:start -->\nold b\n<!-- b:end -->\n")
    readme.replace_block("a", "new a\n", path)
    assert path.read_text() == "top\n<!-- a:start -->\nnew a\n<!-- a:end -->\n<!-- b:start -->\nold b\n<!-- b:end -->\n"
    before = path.read_text()
    for name in ("missing", "a"):  # No markers; then markers doubled.
        if name == "a":
            path.write_text(before + "<!-- a:start -->\n")
        with pytest.raises(SystemExit, match="not updated"):
            readme.replace_block(name, "x\n", path)


def _folder_section(preparation_seconds: float, first_epoch_seconds: float, training_ratio: float) -> dict:
    return {"images": 1000, "source_size": 256, "image_size": 64, "batch_size": 128, "goals": folder.GOALS,
            "measured": {"date": "2026-12-06", "commit": "abc1234", "cpu": "Intel(R) Xeon(R) Processor"},
            "keras_epoch": {"seconds": 10.0, "images": 1000, "images_per_second": 100.0},
            "preparation": {"seconds": preparation_seconds, "images": 1000},
            "epochs": [{"seconds": first_epoch_seconds, "images": 896, "images_per_second": 896 / first_epoch_seconds,
                        "from": "the prepared shards"}],
            "training": [{"model": "cnn", "precision": "float32", "steps_per_loop": 50, "folder": 95.0 * training_ratio,
                          "synthetic": 95.0, "ratio": training_ratio}]}


def test_the_folder_rows_say_each_goal_met_or_not_against_the_keras_epoch():
    met = "\n".join(report.folder_rows({"folder": _folder_section(5.0, 0.5, 0.97)}))
    assert "| Our preparation (`trainer.folder_dataset`) | 5.0s (200 img/s), 2.00x Keras's img/s | ≥ 1x: met |" in met
    assert "| Our epoch 1 after preparing | 0.5s (1,792 img/s), 17.9x Keras's img/s | ≥ 10x: met |" in met
    assert "| Training `cnn` from the folder | 92 img/s, synthetic 95 (97%) | ≥ 95%: met |" in met
    assert "2026-12-06, `abc1234`, Intel Xeon |" in met and "not met" not in met
    missed = "\n".join(report.folder_rows({"folder": _folder_section(20.0, 1.0, 0.9)}))
    assert missed.count("**not met**") == 3, missed
    # A ratio just under a goal shows two decimals, not the goal itself rounded.
    just_under = "\n".join(report.folder_rows({"folder": _folder_section(10.1, 0.5, 0.97)}))
    assert "10.1s (99 img/s), 0.99x Keras's img/s | ≥ 1x: **not met** |" in just_under
    assert report.folder_rows({}) == []


def test_a_folder_timing_that_is_a_median_names_its_runs():
    section = _folder_section(5.0, 0.5, 0.97)
    section["preparation"]["runs_seconds"] = [6.5, 4.0, 5.0]
    rows = "\n".join(report.folder_rows({"folder": section}))
    assert "into an empty `--data_dir`; median of 3 runs (6.50s, 4.00s, 5.00s) |" in rows
    assert rows.count("median of") == 1  # The other timings hold one run, as results from before did.
    assert [folder.median_run([{"seconds": seconds, "images": 9} for seconds in (6.5, 4.0, 5.0)])] == [
        {"seconds": 5.0, "images": 9, "runs_seconds": [6.5, 4.0, 5.0]}]


def test_the_readme_headline_and_the_results_page_are_rendered_from_the_results_file():
    """Regenerate both with: python benchmarks/report.py"""
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    for page, name, expected in (("README.md", "headline", report.headline(results)),
                                 ("docs/results.md", "results", report.markdown(results))):
        text = (ROOT / page).read_text()
        block = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S).group(1)
        assert block == expected, f"{page}'s {name} block: regenerate it with python benchmarks/report.py"
