"""tools/imports.py: import graph, cycles, function-local imports, longest functions; and the real repo's layout."""
import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("layout_imports", ROOT / "tools" / "imports.py")
imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imports)


def write(folder, **files):
    for name, text in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


def test_cycle_is_found_and_fails(tmp_path, capsys):
    write(tmp_path, a="import b\n", b="from c import x\n", c="import a\nx = 1\n")
    graph, local = imports.import_graph(tmp_path)
    assert graph == {"a": ["b"], "b": ["c"], "c": ["a"]} and local == []
    assert imports.find_cycle(graph) == ["a", "b", "c", "a"]
    assert imports.main(["--root", str(tmp_path)]) == 1
    assert "cycle: a -> b -> c -> a" in capsys.readouterr().out


def test_function_local_import_is_reported_and_fails(tmp_path, capsys):
    write(tmp_path, a="import os\n\ndef f():\n    import b\n    return b\n", b="x = 1\n")
    graph, local = imports.import_graph(tmp_path)
    assert graph == {"a": [], "b": []}  # os is no repo module; the local import is no edge
    assert local == [("a.py", 4, "b")]
    assert imports.find_cycle(graph) is None
    assert imports.main(["--root", str(tmp_path)]) == 1
    assert "a.py:4: import b" in capsys.readouterr().out


def test_acyclic_passes_with_leaves_first(tmp_path, capsys):
    write(tmp_path, app="import mid\nimport leaf\n", mid="from leaf import x\n", leaf="import json\nx = 1\n",
          cli='if __name__ == "__main__":\n    import app\n')
    assert imports.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    order = [line.split(" -> ")[0] for line in lines[1:lines.index("cycle: none")]]
    assert order == ["leaf", "mid", "app", "cli"]
    assert "app -> leaf, mid" in lines and "cli -> app" in lines


def test_longest_functions(tmp_path):
    write(tmp_path, m='''\
        def short():
            return 1


        class Box:
            def method(self):
                a = 1
                b = 2
                return a + b

            @property
            def other(self):
                return 0
        ''', empty="x = 1\n")
    result = imports.longest_functions(tmp_path)
    assert result["m.py"] == ("Box.method", 4, 13)
    assert result["empty.py"] == (None, 0, 1)


def test_real_repo_layout(capsys):
    code = imports.main([])
    out = capsys.readouterr().out
    assert code == 0, f"tools/imports.py reports an import cycle or a function-local import:\n{out}"
