"""The test tree has no packages (no __init__.py), so pytest imports each test file by its basename: two files
with one name in different folders stop collection of the whole suite. Catch that here, in seconds."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_has_a_unique_basename() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert names, "no test files found"
    repeated = sorted(name for name, count in names.items() if count > 1)
    assert not repeated, f"test files share a basename (rename one): {repeated}"
