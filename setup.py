from setuptools import find_packages, setup

setup(
    name="mgie_jax",
    version="0.1.0",
    description="JAX/Flax NNX training pipeline for MGIE (MLLM-guided instruction-based image editing)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mgie_jax", "mgie_jax.*", "data_pipelines", "data_pipelines.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.12,<0.13",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "tensorflow-datasets",
        "importlib_resources",   # tfds needs it without TensorFlow
        "pyarrow",
        "grain",
        "transformers>=4.52",
        "diffusers",
        "safetensors",
        "sentencepiece",
        "ml_dtypes",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboardX",
        "matplotlib",           # evaluation plots
        "absl-py",
        "scipy",
        "scikit-image",         # Otsu's threshold for keep-unchanged edits
    ],
    extras_require={
        # torch is only needed for .bin/.pt import and the PyTorch reference tests;
        # pinned so that pip takes the CPU build instead of a multi-GB CUDA one.
        "torch": ["torch==2.13.0"],
        # libtpu (the TPU compiler, from PyPI): `python -m mgie_jax.compile` for TPU slices on any machine.
        "tpu": ["jax[tpu]"],
        # the web demo (python -m mgie_jax.demo)
        "demo": ["gradio>=6,<7"],
        # playwright drives the system's chromium in the browser test (no browser is downloaded)
        "test": ["pytest", "scikit-image", "portpicker", "torch==2.13.0", "jax[tpu]", "gradio>=6,<7",
                 "gradio_client", "playwright", "peft"],
    },
)
