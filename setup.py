from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "vmq" / "__init__.py").read_text(), version)

setup(
    name="vmq",
    version=version["__version__"],
    description="Compression toolchain for Vision Mamba models: PTQ (PTQ4VM), VQ (ViM-VQ), packed files, kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vmq", "vmq.*"]) + ["vmq_cli"],
    package_dir={"vmq_cli": "cli"},
    package_data={"vmq.assets": ["*.safetensors", "*.npz", "*.md", "*.json"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0",
        "safetensors>=0.4",
        "click>=8.1",
        "rich>=13",
        "pyyaml>=6",
        "pydantic>=2",
        "numpy",
        "pillow",
    ],
    extras_require={
        "gpu": ["mamba-ssm", "cupy-cuda12x"],
        "test": ["pytest", "ninja"],
        "train": ["ninja"],
    },
    entry_points={"console_scripts": ["vmq=vmq_cli.main:main"]},
)
