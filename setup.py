from setuptools import setup

setup(
    name="bazar",
    version="0.1.0",
    description="Bazar: a replicated, cached, three-tier book store on Twisted",
    python_requires=">=3.10",
    # package_dir {"": "."} makes `pip install -e` add the checkout to sys.path (a static
    # .pth), which is what lets Twisted find twisted/plugins/bazar_plugins.py.
    package_dir={"": "."},
    packages=["bazar", "bazar.bench", "bazar.http", "bazar.pages", "bazar.replication", "bazar.sim",
              "bazar.testing", "twisted.plugins"],
    package_data={"bazar": ["openapi.json"], "twisted.plugins": ["bazar_plugins.py"]},
    install_requires=[
        "twisted>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "txredisapi==1.6.0",
        "attrs>=23.1.0",
        "prometheus_client>=0.20.0",
        "orjson>=3.9.0",
        "tomli>=2.0; python_version<'3.11'",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-twisted>=1.14", "hypothesis>=6.100", "pyyaml>=6.0", "schemathesis>=4.0",
                 "matplotlib>=3.8", "selenium>=4.10"],
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["bazar = bazar.cli:main", "bazar-bench = bazar.bench.cli:main",
                                      "bazar-sim = bazar.sim.run:main"]},
)
