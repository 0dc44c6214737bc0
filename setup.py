from setuptools import find_packages, setup

setup(
    name="megatron-upcycle",
    version="0.1.0",
    description="Sparse-upcycling research (dense -> MoE) on NVIDIA Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_upcycle", "megatron_upcycle.*"]),
    # Presets, the sbatch template and the launcher ship inside the package (found by
    # megatron_upcycle.resources); the checkout's yaml/, slurm/, launch/ are symlinks to them.
    package_data={"megatron_upcycle.resources": ["yaml/models/*.yaml", "yaml/experiments/*.yaml",
                                                 "slurm/*.sbatch", "launch/*.sh"]},
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the newest for Python 3.11 and the tested default; 0.17-0.19 need Python 3.12
        # (docs/megatron-versions.md; megatron_upcycle.mcore_compat.SUPPORTED must match these).
        "megatron-core>=0.16.1,<0.17; python_version<'3.12'",
        "megatron-core>=0.16.1,<0.20; python_version>='3.12'",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "psutil>=5.9",
        "matplotlib>=3.8",
        "tokenizers>=0.19",
        "filelock>=3.12",  # data: one prepare of a shared directory at a time
        "safetensors>=0.4",
        "tensorboard>=2.15",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        "hf": ["transformers>=5.0,<6"],
        # upcycle bench-inference's GPU engine (the one Doubov et al. used); needs CUDA. vLLM pins
        # its own torch and transformers: install it where those pins can be met.
        "serve": ["vllm>=0.6.2"],
        # `upcycle eval`: EleutherAI lm-evaluation-harness with its hf backend (accelerate, datasets).
        "eval": ["lm-eval[hf]>=0.4,<0.5", "transformers>=5.0,<6"],
        "test": ["pytest>=8", "transformers>=5.0,<6", "lm-eval[hf]>=0.4,<0.5"],
    },
    entry_points={"console_scripts": ["upcycle=megatron_upcycle.cli:console_main"]},
)
