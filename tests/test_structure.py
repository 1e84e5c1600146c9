"""The program stays auditable in one sitting: the measures of doc/architecture.md, checked on every run.

    python tests/test_structure.py     prints the figures
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = ["leadbot.py", "llm.py", "store.py", "mailer.py"]
MAX_FUNCTION, MAX_CLASS = 50, 150  # lines, from the def/class line to the last line of its body


def nonblank(name):
    return sum(1 for line in (REPO / name).read_text(encoding="utf-8").splitlines() if line.strip())


def definitions(name):
    """(name, kind, lines) of every function and class in the module, nested ones too."""
    tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
    return [(node.name, type(node).__name__, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def imports(name):
    tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
    found = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return found | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}


def test_only_the_four_modules_at_the_top():
    assert sorted(path.name for path in REPO.glob("*.py")) == sorted(MODULES)


def test_no_function_over_50_lines_no_class_over_150():
    too_long = [(module, name, lines) for module in MODULES for name, kind, lines in definitions(module)
                if lines > (MAX_CLASS if kind == "ClassDef" else MAX_FUNCTION)]
    assert too_long == []


def test_imports_form_a_tree_with_leadbot_at_the_top():
    """leadbot imports the other three; they import none of the four."""
    assert {"llm", "store", "mailer"} <= imports("leadbot.py")
    for module in MODULES[1:]:
        assert not imports(module) & {"leadbot", "llm", "store", "mailer"}, module


def test_no_line_over_100_characters():
    """Characters, not bytes: a Cyrillic letter counts one."""
    too_long = [(module, number) for module in MODULES
                for number, line in enumerate((REPO / module).read_text(encoding="utf-8").split("\n"), 1)
                if len(line) > 100]
    assert too_long == []


def test_no_global_statement():
    found = [(module, node.lineno) for module in MODULES
             for node in ast.walk(ast.parse((REPO / module).read_text(encoding="utf-8")))
             if isinstance(node, ast.Global)]
    assert found == []


if __name__ == "__main__":
    for module in MODULES:
        longest = max(definitions(module), key=lambda d: d[2])
        print(f"{module:<11} {nonblank(module):>5} non-blank lines; longest: {longest[0]} ({longest[2]} lines)")
    print(f"{'total':<11} {sum(nonblank(m) for m in MODULES):>5} non-blank lines")
