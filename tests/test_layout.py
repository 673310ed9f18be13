"""The four floors (DESIGN.md, "Architecture"): each package imports only the floors below it."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "torch_qode"
#: floor of each top-level entry of the package; ``_checks``, ``_figure`` and ``_lazy`` sit below everything
FLOORS = {"_checks": 0, "_figure": 0, "_lazy": 0, "core": 1, "bridge": 2, "training": 3,
          "models": 4, "data": 4, "plotting": 4, "lightning": 4, "integrations": 4}


def _imports(path: pathlib.Path):
    """(line, top-level torch_qode entry) of every import in ``path``, function-level ones included."""
    parts = path.relative_to(ROOT).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:-1])[:len(parts) - node.level]
                full = base + (node.module.split(".") if node.module else [])
                names = [full[0]] if full else [a.name for a in node.names]
            elif (node.module or "").split(".")[0] == "torch_qode":
                mod = node.module.split(".")
                names = [mod[1]] if len(mod) > 1 else [a.name for a in node.names]
            else:
                continue
            yield from ((node.lineno, n) for n in names)
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[1]) for a in node.names
                        if a.name.startswith("torch_qode."))


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0].removesuffix(".py") in FLOORS)


def test_every_entry_has_a_floor():
    entries = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.name != "__init__.py"
               and not p.name.startswith("__") and (p.suffix == ".py" or p.is_dir())}
    assert entries <= set(FLOORS), f"give these a floor in tests/test_layout.py: {sorted(entries - set(FLOORS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_floor_imports_a_higher_one(path):
    me = FLOORS[path.relative_to(ROOT).parts[0].removesuffix(".py")]
    bad = [f"line {line}: imports {name!r} (floor {FLOORS[name]})" for line, name in _imports(path)
           if FLOORS.get(name, -1) > me]
    assert not bad, f"{path.relative_to(ROOT)} (floor {me}) " + "; ".join(bad)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The test above can fail: a core module importing the training floor is caught."""
    fake = tmp_path / "torch_qode" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..training.qode import QODE\nimport torch_qode.bridge.flat\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "torch_qode")
    assert [n for _, n in _imports(fake / "bad.py")] == ["training", "bridge"]


#: issue 10's size limits: modules stay readable, and no class grows back into a god object
MAX_MODULE_LINES, MAX_CLASS_LINES = 600, 400


def _python_files():
    top = ROOT.parent
    return sorted(p for d in ("torch_qode", "recipes") for p in (top / d).rglob("*.py"))


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_module_and_class_sizes(path):
    text = path.read_text()
    lines = text.count("\n") + 1
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines > {MAX_MODULE_LINES}: split it by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{path.name}: class {node.name} has {size} lines > {MAX_CLASS_LINES}"
