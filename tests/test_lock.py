"""requirements.lock (what make setup installs) agrees with pyproject.toml and with the running environment.

Fast and offline: it reads the two files and importlib.metadata, nothing else.
"""

import re
import tomllib
import warnings
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .support import ROOT

LOCK = ROOT / "requirements.lock"
EXTRAS = ("dev", "cluster")  # the extras make setup installs (from the lock)
FIX = "run `make lock` (then `make test`)"


def parse_lock(text: str) -> list[tuple[Requirement, list[str]]]:
    """Each pin in a pip requirements file: (requirement, its sha256 hashes)."""
    pins = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{LOCK.name}: unexpected option line {line!r}; {FIX}"
        spec, _, options = line.partition(" --")
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", "--" + options)
        pins.append((Requirement(spec), hashes))
    return pins


@pytest.fixture(scope="module")
def pins() -> dict[str, Version]:
    assert LOCK.is_file(), f"{LOCK.name} is missing; {FIX}"
    locked = parse_lock(LOCK.read_text())
    seen: dict[str, Version] = {}
    for req, hashes in locked:
        name = canonicalize_name(req.name)
        clauses = list(req.specifier)
        assert len(clauses) == 1 and clauses[0].operator == "==" and "*" not in clauses[0].version, (
            f"{LOCK.name}: {str(req)!r} is not an exact == pin; {FIX}"
        )
        assert hashes, f"{LOCK.name}: {req.name} has no --hash=sha256: (pip --require-hashes refuses it); {FIX}"
        assert name not in seen, f"{LOCK.name}: {name} is pinned twice; {FIX}"
        seen[name] = Version(clauses[0].version)
    assert seen, f"{LOCK.name} pins nothing; {FIX}"
    return seen


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_pyproject_requirement_is_pinned_within_its_range(pins):
    problems = []
    for req in project_requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue  # not for this platform
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in {LOCK.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} but {LOCK.name} pins {name}=={pins[name]}")
    assert not problems, "pyproject.toml and the lock disagree:\n  " + "\n  ".join(problems) + f"\n{FIX}"


def test_the_installed_versions_are_the_locked_ones(pins):
    """make setup installs the lock; a venv that drifted from it (a pip install by hand, an old venv) is not
    the tested set."""
    wrong, missing = [], []
    for name, version in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if Version(installed) != version:
            wrong.append(f"{name}: installed {installed}, locked {version}")
    assert not wrong, (
        "this environment is not the locked one:\n  "
        + "\n  ".join(wrong)
        + f"\nrun `rm .venv/.installed; make setup` to install {LOCK.name} (or, to move a pin instead, "
        "`make lock LOCK_ARGS='-P name==version'`, then `make test`)"
    )
    if missing:
        warnings.warn(f"not installed, so not compared with {LOCK.name}: {', '.join(missing)}", stacklevel=1)


def test_parse_lock_reads_continued_lines_and_hashes():
    text = (
        "# header\n"
        "Foo_Bar==1.0 \\\n"
        "    --hash=sha256:" + "a" * 64 + " \\\n"
        "    --hash=sha256:" + "b" * 64 + "\n"
        "    # via x\n"
        "baz==2 --hash=sha256:" + "c" * 64 + "\n"
    )
    (foo, foo_hashes), (baz, baz_hashes) = parse_lock(text)
    assert (canonicalize_name(foo.name), str(foo.specifier), foo_hashes) == ("foo-bar", "==1.0", ["a" * 64, "b" * 64])
    assert (baz.name, baz_hashes) == ("baz", ["c" * 64])
