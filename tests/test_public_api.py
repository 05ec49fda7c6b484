"""The public API moves only on purpose: a snapshot, a CHANGELOG entry and the version go with every change."""

import re
import sys
import warnings
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from public_api import describe_api  # noqa: E402


def test_the_public_api_matches_its_snapshot():
    snapshot = (ROOT / "tests" / "public_api.txt").read_text().splitlines()
    now = describe_api()
    gone, new = sorted(set(snapshot) - set(now)), sorted(set(now) - set(snapshot))
    assert not gone and not new, (
        "the public API changed: record it in CHANGELOG.md (with the migration, and a DeprecationWarning for one "
        "minor version where a name or signature is replaced), move the version, then run "
        f"`python tools/public_api.py > tests/public_api.txt`.\nremoved or changed: {gone}\nadded or changed: {new}")


def test_version_and_changelog_agree():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert rlhf_book.__version__ == version
    first = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert first == version, f"CHANGELOG.md's newest section is {first}, the package is {version}"


def test_deprecated_names_warn_and_still_work():
    from rlhf_book._deprecation import deprecated_alias

    def new(x):
        return 2 * x

    old = deprecated_alias(new, "old_name", "new", since="0.2.0")
    with pytest.warns(DeprecationWarning, match=r"old_name is deprecated since 0\.2\.0.*use new instead"):
        assert old(3) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert new(3) == 6
