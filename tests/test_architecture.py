"""The layers hold: import-linter's contracts pass, they fail when broken, and the hub's command
runs without the site's imaging stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
#: Modules the hub must not need: the site's imaging stack and every site-side module.
SITE_SIDE = (
    "nipype",
    "bids",
    "nibabel",
    "opendp",
    "fednipype.site",
    "fednipype.bids",
    "fednipype.bids_filters",
    "fednipype.participants",
    "fednipype.derivatives",
    "fednipype.features",
    "fednipype.grids",
    "fednipype.images",
    "fednipype.reductions",
    "fednipype.atlas",
    "fednipype.interfaces",
    "fednipype.workflows",
)
#: About what one reads in a sitting (DESIGN: modules of ~600 lines).
MAX_MODULE_LINES = 650


def _lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_are_kept():
    result = _lint_imports(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


def test_a_hub_module_importing_site_code_breaks_the_contracts(tmp_path):
    """The same contracts, on a copy of the package whose pooling imports the site's ledger."""
    shutil.copytree(REPO / "fednipype", tmp_path / "fednipype")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    pooling = tmp_path / "fednipype" / "hub" / "pooling.py"
    text = pooling.read_text(encoding="utf-8")
    pooling.write_text(
        text.replace(
            "from fednipype.exceptions import",
            "from fednipype.site.ledger import PrivacyLedger  # noqa: F401\n"
            "from fednipype.exceptions import",
            1,
        ),
        encoding="utf-8",
    )
    result = _lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The hub imports nothing of a site BROKEN" in result.stdout
    assert "fednipype.hub.pooling -> fednipype.site.ledger" in result.stdout


def test_a_server_app_importing_site_code_breaks_the_contracts(tmp_path):
    """The Flower server app runs at the coordinator: importing site code breaks a contract."""
    shutil.copytree(REPO / "fednipype", tmp_path / "fednipype")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    server = tmp_path / "fednipype" / "federated" / "app" / "server.py"
    text = server.read_text(encoding="utf-8")
    server.write_text(
        text.replace(
            "from fednipype.exceptions import",
            "from fednipype.site.answer import answer_request  # noqa: F401\n"
            "from fednipype.exceptions import",
            1,
        ),
        encoding="utf-8",
    )
    result = _lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The federation's server side imports nothing of a site BROKEN" in result.stdout
    assert "fednipype.federated.app.server -> fednipype.site.answer" in result.stdout


def test_the_hub_command_runs_without_the_site_stack(three_site_releases, tmp_path):
    """``fednipype-meta`` on three releases imports no Nipype, pybids, nibabel, OpenDP or
    site-side fednipype module (checked in a fresh interpreter)."""
    paths, _ = three_site_releases
    script = (
        "import json, sys\n"
        "from fednipype.cli import hub\n"
        f"code = hub.main({[str(p) for p in paths]!r} + ['-o', {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    loaded = [
        m for m in report["modules"] if any(m == s or m.startswith(s + ".") for s in SITE_SIDE)
    ]
    assert loaded == []
    assert "fednipype.hub.pooling" in report["modules"]
    assert (tmp_path / "out" / "pooled_results.tsv").is_file()


def test_modules_are_small_enough_to_read_in_one_sitting():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
        for p in (REPO / "fednipype").rglob("*.py")
    }
    assert len(sizes) > 30
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
