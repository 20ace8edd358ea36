"""scripts/make_results.py keeps the hand-written part of RESULTS.md and rewrites only its tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_results"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_build_replaces_only_the_marked_section(tmp_path):
    mr = _module()
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Results\n\nheadline kept\n\n{mr.BEGIN}\nold table\n{mr.END}\n\ntail kept\n")
    table = mr.Table("t1", "A table", [["echo", "hi"]], "render_missing", ["nothing.json"])
    mr.build([table], tmp_path, {}, out)
    text = out.read_text()
    assert "headline kept" in text and "tail kept" in text
    assert "old table" not in text
    assert "### A table" in text and "_Not produced yet._" in text
    assert text.index(mr.BEGIN) < text.index("### A table") < text.index(mr.END)
    mr.build([table], tmp_path, {}, out)  # idempotent
    assert out.read_text() == text


def test_build_writes_a_fresh_page(tmp_path):
    mr = _module()
    out = tmp_path / "new.md"
    mr.build([], tmp_path, {}, out)
    text = out.read_text()
    assert text.startswith("# Results") and mr.BEGIN in text and mr.END in text
