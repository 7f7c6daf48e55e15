"""The package's shape: no import circle between its modules (issue 15), counted from the
source itself, including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nca_jax"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (anywhere in the file)."""
    names = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in package.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == package.name:
                    deps |= {a.name for a in node.names if a.name in names}
                elif node.module.startswith(package.name + "."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(package.name + "."):
                        deps.add(a.name.split(".")[1])
        graph[p.stem] = deps - {p.stem, "__init__"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


def test_errors_module_imports_nothing_of_the_package():
    assert import_graph()["errors"] == set()


ENTRY_POINTS = (
    "train_cli",
    "finetune_cli",
    "evaluate",
    "export_cli",
    "demo",
    "bench",
    "capture",
    "phantoms",
    "device_train",
)


def test_every_entry_point_follows_the_one_convention():
    """main(argv) -> int raising NcaError; cli() = run_cli(main); `python -m` calls cli()."""
    import importlib
    import inspect

    for name in ENTRY_POINTS:
        mod = importlib.import_module(f"nca_jax.{name}")
        assert list(inspect.signature(mod.main).parameters) == ["argv"], name
        src = inspect.getsource(mod)
        assert 'if __name__ == "__main__":\n    cli()' in src, name
        assert "run_cli(main)" in inspect.getsource(mod.cli), name
        assert 'print(f"error:' not in src, f"{name} prints its own errors"
    for script in (
        "train.py",
        "finetune.py",
        "evaluate.py",
        "export_tflite.py",
        "bench.py",
        "demo.py",
    ):
        text = (PACKAGE.parent / script).read_text()
        assert "import cli" in text and text.rstrip().endswith("cli()"), script


def test_call_main_turns_project_errors_into_exit_2(capsys):
    from nca_jax.cli import call_main
    from nca_jax.errors import DeviceError, ExportError

    for err in (DeviceError, ExportError):

        def bad(argv, err=err):
            raise err("x.tflite: not a model")

        assert call_main(bad, []) == 2
        assert capsys.readouterr().err == "error: x.tflite: not a model\n"
    assert call_main(lambda argv: 0, []) == 0


def test_every_file_write_goes_through_the_atomic_helpers():
    """No module writes a file itself: config.atomic_write_bytes / atomic_write_text and
    render.save_image / save_figure / save_gif write to a temporary name and rename."""
    import re

    own_write = re.compile(r"\.(write_text|write_bytes)\(|\.save\((?!buf)|savefig\((?!buf)")
    allowed = {("nca_jax", "config.py"), ("nca_jax", "render.py")}
    offenders = []
    for folder in (PACKAGE, PACKAGE.parent / "experiments"):
        for p in sorted(folder.glob("*.py")):
            if (folder.name, p.name) in allowed:
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if own_write.search(code) and "mngr.save" not in code and "saved_model" not in code:
                    offenders.append(f"{folder.name}/{p.name}:{i}: {line.strip()}")
    assert offenders == []
    # the rule sees the kinds of write it forbids
    for line in ("Image.fromarray(x).save(path)", "p.write_text(t)", "fig.savefig(tmp, dpi=9)"):
        assert own_write.search(line), line
