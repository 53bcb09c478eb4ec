"""The README names the tests that prove what it guarantees: every test it names exists, under that name."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT_NAMES = {"R": "tests/test_reliability.py", "H": "tests/test_hostile_input.py", "G": "tests/test_registry.py",
               "T": "tests/test_train_ray.py"}
"""The abbreviations of the README's "What loramill guarantees" section."""


def test_every_test_the_readme_names_exists():
    readme = (REPO / "README.md").read_text()
    named = [(SHORT_NAMES[short], name) for short, name in re.findall(r"\b([RHGT])::(test_\w+)", readme)]
    named += re.findall(r"(tests/\w+\.py)::(test_\w+)", readme)
    assert len(named) > 30  # the guarantees section is read, not skipped by a changed notation
    missing = [f"{file}::{name}" for file, name in named
               if not re.search(rf"^def {name}\(", (REPO / file).read_text(), re.MULTILINE)]
    assert not missing, f"the README names tests that do not exist: {missing}"
