"""The line budgets, counted in `ruff format` lines, so that packing code buys nothing. Run by .ci/run, not by
pytest: budgets are for this repository's own growth, and a fork's quick idea should not fail a test.

It fails, one line per problem, when a top-level *.py file has no budget in the README's file table, a file is over
its budget, the files together are over the table's total, the files a reader of the method traverses are over
the table's `reading path` row, or a function is over the limit in pyproject.toml
([tool.budgets]) and is not one of the long functions listed there, or is over its ceiling there.

    python .ci/budgets.py          # check; prints file, lines, budget
    python .ci/budgets.py --list   # today's long functions, in pyproject.toml's format

Standard library only, plus the ruff that requirements-dev.txt pins.
"""

import argparse
import ast
import os
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A file's row: | `model.py` | what it holds | 1280 |; the total's row: | total | ... | 5600 |.
FILE_ROW = re.compile(r"^\| `([\w.]+\.py)` \|.*\| (\d[\d,]*) \|$", re.M)
TOTAL_ROW = re.compile(r"^\| (?:\*\*)?total(?:\*\*)? \|.*\| (\d[\d,]*) \|$", re.M)
# The reading path's row names its files: | reading path | `model.py`, `losses.py`, ... | 4000 |.
READING_ROW = re.compile(r"^\| reading path \|(.*)\| (\d[\d,]*) \|$", re.M)


def read_budgets(readme_text):
    """The README's file table -> ({file: budget}, total budget or None)."""
    budgets = {}
    for name, n in FILE_ROW.findall(readme_text):
        budgets[name] = int(n.replace(",", ""))
    total = TOTAL_ROW.search(readme_text)
    if total is None:
        return budgets, None
    return budgets, int(total.group(1).replace(",", ""))


def read_reading_path(readme_text):
    """The README's `reading path` row -> (its files, its budget), or None when there is no such row."""
    row = READING_ROW.search(readme_text)
    if row is None:
        return None
    return re.findall(r"`([\w.]+\.py)`", row.group(1)), int(row.group(2).replace(",", ""))


def ruff(*args, stdin=None, cwd=ROOT):
    """Runs the ruff that is installed with this Python (requirements-dev.txt pins it)."""
    cmd = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=cwd)


def formatted(path, root=ROOT):
    """The text of `path` as `ruff format` writes it, with the settings of root's pyproject.toml."""
    with open(path) as f:
        text = f.read()
    name = os.path.relpath(path, root)
    out = ruff("format", "--stdin-filename", name, "-", stdin=text, cwd=root)
    if out.returncode != 0:
        raise SystemExit(f"budgets: ruff format could not format {name}:\n{out.stderr.strip()}")
    return out.stdout


def function_lengths(text):
    """{qualified name: lines from its `def` to its last line} for every function and method, nested ones too."""
    lengths = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    # a name defined twice (if / else, a property's setter) keeps its longest
                    lengths[name] = max(n, lengths.get(name, 0))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(text), "")
    return lengths


def measure(root=ROOT):
    """{file: formatted lines} and {"file:function": formatted lines} for the top-level *.py files of root."""
    lines = {}
    functions = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        text = formatted(os.path.join(root, name), root)
        lines[name] = len(text.splitlines())
        for fn, n in function_lengths(text).items():
            functions[f"{name}:{fn}"] = n
    return lines, functions


def problems(lines, functions, budgets, total, limit, long_functions, reading=None):
    """Every way the measured sizes break the budgets, one sentence each; reading: (files, budget)."""
    out = []
    for name, n in lines.items():
        if name not in budgets:
            out.append(f"{name}: no line budget in the README's file table (add a row for it)")
        elif n > budgets[name]:
            out.append(f"{name}: {n} formatted lines, over its README budget of {budgets[name]}")
    for name in budgets:
        if name not in lines:
            out.append(f"README: the file table budgets {name}, which does not exist")
    lines_in_all = sum(lines.values())
    if total is None:
        out.append("README: the file table has no `| total | ... | N |` row")
    elif lines_in_all > total:
        out.append(f"total: {lines_in_all} formatted lines, over the README's total of {total}")
    if reading is not None:
        files, budget = reading
        missing = [f for f in files if f not in lines]
        for name in missing:
            out.append(f"README: the reading path names {name}, which does not exist")
        on_path = sum(lines[f] for f in files if f in lines)
        if on_path > budget:
            out.append(f"reading path: {on_path} formatted lines, over the README's {budget}")
    for fn, n in functions.items():
        ceiling = long_functions.get(fn, limit)
        if n > ceiling:
            where = "its ceiling in pyproject.toml" if fn in long_functions else "the limit"
            out.append(f"{fn}: {n} formatted lines, over {where} of {ceiling}")
    # the list only shrinks: a function that shrank lowers its ceiling, one within the limit leaves the list
    table = "pyproject.toml's [tool.budgets.long-functions]"
    for fn, ceiling in long_functions.items():
        n = functions.get(fn)
        if n is None:
            out.append(f"{fn}: no such function now, drop it from {table}")
        elif n <= limit:
            out.append(f"{fn}: {n} lines now, within {limit}: drop it from {table}")
        elif n < ceiling:
            out.append(f"{fn}: {n} lines now, lower its ceiling of {ceiling} in {table}")
    return out


def pinned_ruff(root=ROOT):
    """The version requirements-dev.txt pins ruff to, or None."""
    with open(os.path.join(root, "requirements-dev.txt")) as f:
        pin = re.search(r"^ruff==([\w.]+)", f.read(), re.M)
    return pin.group(1) if pin else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print today's long functions and exit")
    args = p.parse_args()
    version = ruff("--version").stdout.split()[-1]
    pin = pinned_ruff()
    if version != pin:
        sys.exit(f"budgets: ruff {version} is installed, requirements-dev.txt pins {pin}")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        settings = tomllib.load(f)["tool"]["budgets"]
    limit = settings["max-function-lines"]
    long_functions = settings.get("long-functions", {})
    lines, functions = measure()
    if args.list:
        for fn, n in sorted(functions.items()):
            if n > limit:
                print(f'"{fn}" = {n}')
        return
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    budgets, total = read_budgets(readme)
    reading = read_reading_path(readme)
    found = problems(lines, functions, budgets, total, limit, long_functions, reading)
    if found:
        print("\n".join(f"budgets: {line}" for line in found))
        sys.exit(1)
    print("| file | lines | budget |")
    for name, n in lines.items():
        print(f"| {name} | {n} | {budgets[name]} |")
    print(f"| total | {sum(lines.values())} | {total} |")
    if reading is not None:
        print(f"| reading path | {sum(lines[f] for f in reading[0])} | {reading[1]} |")
    long_now = sum(1 for fn in functions if fn in long_functions)
    print(f"functions: none over {limit} lines but the {long_now} listed in pyproject.toml")


if __name__ == "__main__":
    main()
