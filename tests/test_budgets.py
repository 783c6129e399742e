"""The README's file table states a line budget for each top-level file; every file that exists stays within it."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_files_within_readme_budgets():
    readme = open(os.path.join(ROOT, "README.md")).read()
    budgets = {m[0]: int(m[1]) for m in re.findall(r"^\| `([\w.]+\.py)` \|.*\| (\d+) \|$", readme, re.M)}
    assert "model.py" in budgets
    for fn in os.listdir(ROOT):
        if fn.endswith(".py"):
            assert fn in budgets, f"{fn} has no line budget in the README's file table"
            n = sum(1 for _ in open(os.path.join(ROOT, fn)))
            assert n <= budgets[fn], f"{fn} has {n} lines, over its README budget of {budgets[fn]}"
