"""Installs robust_u1_jax: `pip install -e .[test]` for development."""

import setuptools

# The JAX stack is pinned as one set that is known to install and run together.
JAX_STACK = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "dm-pix==0.4.5",
    "chex==0.1.92",
]

INSTALL_REQUIRES = JAX_STACK + [
    "transformers==5.24.0",
    "tokenizers>=0.22",
    "safetensors>=0.5",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "pillow>=10.1",  # ImageFont.load_default(size=...): the report grids' titles
    "numpy>=1.26",
    "scipy>=1.11",
    "tqdm>=4.66",
    "pyarrow>=15",
    "tensorboardX==2.6.4",
    "matplotlib>=3.9",  # evaluation report figures
]

EXTRAS = {
    # Test tools, the linter, and the PyTorch reference implementations of the parity tests.
    # open_clip needs torchvision, and torchvision 0.29.1 only imports beside its own torch build
    # (2.14.1), so the pair is pinned.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "ruff==0.17.6",  # lint (ruff.toml), run by .ci/run before the tests
        "torch==2.14.1",
        "torchvision==0.29.1",
        "diffusers==0.42.1",
        "open-clip-torch==3.3.0",
        "pytorch-msssim==1.0.0",
        "scikit-image==0.26.0",
    ],
    "cuda": ["jax[cuda12]==0.10.2"],
    # jax 0.10.2's own `tpu` extra pins libtpu 0.0.42.*: on TPU VMs, and on any CPU machine for
    # ahead-of-time compiles against a TPU topology (`python -m robust_u1_jax.bench aot`).
    # gcsfs: JAX reads and writes a gs:// compilation cache (`tpu_pod.sh --cache`) through
    # etils.epath, which without it warns once and caches nothing.
    "tpu": ["jax[tpu]==0.10.2", "gcsfs>=2024.2"],
}

setuptools.setup(
    name="robust_u1_jax",
    version="0.1.0",
    description="Robust-U1 (self-recovering unified multimodal model) in JAX/Flax, TPU-first.",
    packages=setuptools.find_packages(include=["robust_u1_jax", "robust_u1_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
