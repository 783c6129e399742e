"""The README's promises name their tests, and the tests they name exist (pytest runs them all)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def promises():
    text = (ROOT / "README.md").read_text()
    section = text.split("## What we promise", 1)[1].split("\n## ", 1)[0]
    return [b for b in re.split(r"\n- ", section) if b.lstrip().startswith("**")]


def test_every_promise_names_tests_that_exist():
    bullets = promises()
    assert len(bullets) >= 7
    for bullet in bullets:
        named = re.findall(r"(test_\w+\.py)::(test_\w+)", bullet)
        assert named, f"a promise names no test: {bullet[:60]}"
        for file, name in named:
            source = (ROOT / "tests" / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
