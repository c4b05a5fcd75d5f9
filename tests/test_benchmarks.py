"""The benchmark script's bookkeeping: rerunning some models keeps the others' results."""

import pytest

from benchmarks import readme
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
