"""Packaging for aioli_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed as
``aioli_fast.kernels``: a package named ``kernels`` already exists on the package registry, so a
top-level ``import kernels`` would collide (docs/DECISIONS.md).
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PACKAGES = [
    "aioli_fast",
    "aioli_fast.data",
    "aioli_fast.harness",
    "aioli_fast.integrations",
    "aioli_fast.mixing",
    "aioli_fast.train",
]

setup(
    name="aioli_fast",
    version="0.1.0",
    description="Online data mixing (Aioli) for LLM pretraining at production speed",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*PACKAGES, "aioli_fast.kernels"],
    package_dir={"aioli_fast.kernels": "kernels"},
    package_data={"aioli_fast": ["py.typed"]},
    install_requires=[
        # The installer (install.py) puts torch==2.13.0 in first when no torch is present, so this
        # range is already satisfied and pip does not pull a different, multi-GB build.
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy>=1.24",
        "webdataset>=0.2.100",
        "deepspeed>=0.15",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # aioli-fast report
    ],
    extras_require={
        # flash-attn compiles against CUDA: it cannot be installed on a CPU-only machine.
        "flash": ["flash-attn>=2.5"],
        "hf": ["tokenizers>=0.15"],
        # prepare's readers of Parquet / Arrow / datasets folders and of zstandard-compressed JSON lines
        "data": ["pyarrow>=14", "zstandard>=0.22"],
        "bench": ["pytest-benchmark>=4.0"],
        # corpora on object storage (s3://, gs://, https://): fsspec and the providers' filesystems
        "cloud": ["fsspec[http]>=2023.1", "s3fs>=2023.1", "gcsfs>=2023.1"],
        # the training stacks aioli_fast plugs into (aioli_fast.integrations, per-domain evaluation)
        # torchtitan 0.x changes its extension points between releases: the adapter is written for 0.3.0
        "integrations": [
            "transformers>=5.0",
            "accelerate>=1.0",
            "lightning>=2.4",
            "torchtitan==0.3.0; python_version >= '3.11'",
        ],
        "dev": [
            "transformers>=5.0",
            "accelerate>=1.0",
            "lightning>=2.4",
            "torchtitan==0.3.0; python_version >= '3.11'",
            "pytest>=7.4",
            "pytest-benchmark>=4.0",
            "tokenizers>=0.15",
            "pyarrow>=14",
            "zstandard>=0.22",
            "datasets>=3.0",
            "fsspec[http]>=2023.1",
            "s3fs>=2023.1",
            "gcsfs>=2023.1",
            "moto[server]>=5.0",  # the S3 server the remote-corpus tests and bench_loader --remote run
            "ruff>=0.5",
        ],
    },
    entry_points={
        "console_scripts": ["aioli-fast=aioli_fast.cli:main"],
        # subcommands of aioli-fast from outside the core: the research harness's corpus, sweep and demo
        # (another package adds its own the same way; docs/DECISIONS.md)
        "aioli_fast.commands": ["harness=aioli_fast.harness.commands:add_commands"],
    },
)
