"""The budget check of .ci/run (.ci/budgets.py): it reads the README's table, counts `ruff format` lines, and names
each problem. These tests feed it a small README and folder of their own; the repository's budgets are not tested
here (a file that grows fails .ci/run, not pytest)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("budgets", os.path.join(ROOT, ".ci", "budgets.py"))
budgets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(budgets)

README = """
| file | what it holds | lines (budget) |
|---|---|---|
| `model.py` | the model | 1,280 |
| `data.py` | pairs, and `| pipes |` in the text | 350 |
| total | all the top-level `*.py` files together | 5600 |
| `assets/` | the base model | — |
| setting | 2 | 3 |
"""


def test_readme_rows_and_total():
    files, total = budgets.read_budgets(README)
    assert files == {"model.py": 1280, "data.py": 350}
    assert total == 5600
    assert budgets.read_budgets(README.replace("| total |", "| all |"))[1] is None


def test_counts_formatted_lines_and_functions(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 100\n")
    # 3 lines as written; ruff format splits the packed statement and adds the blank lines around `f`
    (tmp_path / "packed.py").write_text("import os\ndef f(): a = 1; return os.sep * a\nx = f()\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    lines, functions = budgets.measure(str(tmp_path))
    text = budgets.formatted(str(tmp_path / "packed.py"), str(tmp_path))
    assert text == "import os\n\n\ndef f():\n    a = 1\n    return os.sep * a\n\n\nx = f()\n"
    assert lines == {"packed.py": 9}
    assert functions == {"packed.py:f": 3}


def test_function_names_nested_and_methods():
    text = (
        "class A:\n    def m(self):\n        def inner():\n            pass\n\n        return 1\n"
    )
    assert budgets.function_lengths(text) == {"A.m": 5, "A.m.inner": 2}


def test_every_problem_is_named():
    lines = {"model.py": 1300, "new.py": 10, "data.py": 300}
    functions = {"model.py:f": 61, "model.py:g": 80, "model.py:h": 70, "data.py:k": 40}
    long_functions = {"model.py:g": 75, "model.py:h": 90, "data.py:k": 65, "data.py:gone": 70}
    found = budgets.problems(
        lines, functions, {"model.py": 1280, "data.py": 350, "old.py": 5}, 1500, 60, long_functions
    )
    assert found == [
        "model.py: 1300 formatted lines, over its README budget of 1280",
        "new.py: no line budget in the README's file table (add a row for it)",
        "README: the file table budgets old.py, which does not exist",
        "total: 1610 formatted lines, over the README's total of 1500",
        "model.py:f: 61 formatted lines, over the limit of 60",
        "model.py:g: 80 formatted lines, over its ceiling in pyproject.toml of 75",
        "model.py:h: 70 lines now, lower its ceiling of 90 in pyproject.toml's [tool.budgets.long-functions]",
        "data.py:k: 40 lines now, within 60: drop it from pyproject.toml's [tool.budgets.long-functions]",
        "data.py:gone: no such function now, drop it from pyproject.toml's [tool.budgets.long-functions]",
    ]
    within = budgets.problems(
        {"model.py": 1280}, {"model.py:g": 75}, {"model.py": 1280}, 1280, 60, {"model.py:g": 75}
    )
    assert within == []
    assert budgets.problems({}, {}, {}, None, 60, {}) == [
        "README: the file table has no `| total | ... | N |` row"
    ]


def test_the_reading_path_row():
    readme = README + "| reading path | `model.py`, `data.py` | 1,500 |\n"
    assert budgets.read_reading_path(readme) == (["model.py", "data.py"], 1500)
    assert budgets.read_reading_path(README) is None
    reading = (["model.py", "data.py", "gone.py"], 1500)
    found = budgets.problems(
        {"model.py": 1280, "data.py": 300},
        {},
        {"model.py": 1280, "data.py": 350},
        2000,
        60,
        {},
        reading,
    )
    assert found == [
        "README: the reading path names gone.py, which does not exist",
        "reading path: 1580 formatted lines, over the README's 1500",
    ]
