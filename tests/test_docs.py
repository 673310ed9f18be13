"""The documentation: the MkDocs site builds in strict mode, the README stays short, its relative links
resolve and its Python example runs, and the benchmark scripts' table writer writes pages."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)          # links inside code blocks are not links
    return [m.group(1) for m in LINK.finditer(text)]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-8000:]
    assert (tmp_path / "site" / "api" / "training.html").exists()


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/ (the site) and link it"


def test_readme_relative_links_exist():
    links = _links(README.read_text(encoding="utf-8"))
    assert links, "no links found in README.md"
    missing = []
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue                                          # URLs, mailto:, in-page anchors
        path = link.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(link)
    assert not missing, f"README.md links to missing files: {missing}"


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_examples_run(tmp_path):
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no python example"
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(code, encoding="utf-8")
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, f"README python block {i} failed:\n{code}\n{out.stderr[-4000:]}"
        assert out.stdout.strip(), f"README python block {i} printed nothing"


def _tables_module():
    spec = importlib.util.spec_from_file_location("_bench_tables", ROOT / "benchmarks" / "_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_table_writer(tmp_path, capsys):
    t = _tables_module()
    md = t.table(["n", "time (ms)"], [(8, "1.2"), (16, "a|b")])
    assert md.splitlines()[:2] == ["| n | time (ms) |", "|---|---:|"]
    assert "a\\|b" in md
    path = t.write_page("example", "Example", "Some words.", md, out_dir=tmp_path / "new")
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "new" / "example.md"
    assert text.startswith("# Example\n\nWritten by `python ")
    assert "at commit `" in text and "| 16 | a\\|b |" in text
    with t.recorded("printed", "Printed", out_dir=tmp_path):
        print("| a |\n|---|\n| 1 |")
    assert "| 1 |" in (tmp_path / "printed.md").read_text(encoding="utf-8")
    with pytest.raises(RuntimeError), t.recorded("failed", "Failed", out_dir=tmp_path):
        raise RuntimeError("a failed run writes no page")
    assert not (tmp_path / "failed.md").exists()
    with pytest.raises(ValueError, match="index"):
        t.write_page("index", "Overview", out_dir=tmp_path)
    with pytest.raises(ValueError, match="columns"):
        t.table(["a", "b"], [(1,)])


# scripts added while the table writer went in, still to adopt it: wrap their ``main()`` in
# ``with recorded("<stem>", "<title>"):`` (``from _tables import recorded``) and drop them from here
PENDING = {"import_time.py"}


def test_every_benchmark_writes_its_page():
    """Each script in benchmarks/ writes its table through _tables, and its page is in the site's nav."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name.startswith("_") or script.name in PENDING:
            continue
        src = script.read_text(encoding="utf-8")
        assert "from _tables import" in src, f"{script.name} does not write its table through benchmarks/_tables.py"
        assert f'"{script.stem}"' in src, f"{script.name} does not write docs/benchmarks/{script.stem}.md"
        assert (ROOT / "docs" / "benchmarks" / f"{script.stem}.md").exists()
        assert f"benchmarks/{script.stem}.md" in nav, f"docs/benchmarks/{script.stem}.md is not in mkdocs.yml's nav"
