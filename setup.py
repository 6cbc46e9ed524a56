from setuptools import find_packages, setup

setup(
    name="molora_ds",
    version="0.1.0",
    description="Mixture of low-rank experts (MoE-LoRA) fine-tuning with Riemannian optimizers on DeepSpeed",
    packages=find_packages(include=["molora_ds", "molora_ds.*"]),
    # model configs for planning without the hub; the CPU kernels' source, compiled at first use
    package_data={"molora_ds": ["models/configs/*.json", "optim/*.cpp", "modules/*.cpp", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "datasets>=3.0",
        "mpi4py>=4.0",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "peft>=0.13", "pre-commit>=3.7"],
    },
)
