"""rlhf_jax: InstructGPT-style pretraining -> SFT -> reward model -> PPO-ptx in JAX/Flax."""
from setuptools import find_packages, setup

# Versions tested together on CPU (Python 3.11). Bump as a set.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "sentencepiece==0.2.3",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",  # TFDS array_record file format, random-access reading without TensorFlow
    "absl-py==2.5.1",
    "ml_collections==1.1.0",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "safetensors==0.8.0",  # Hugging Face checkpoint format (numpy backend, no torch)
    "tokenizers==0.23.3",  # HF tokenizer.json / byte-level BPE (Rust, no torch)
    "jinja2==3.1.6",  # checkpoints' chat templates
    "matplotlib==3.11.2",  # PNG plots of training curves
    "numpy>=2.0,<3",
]

EXTRAS = {
    # NVIDIA GPUs: the CUDA 12 plugin matching jaxlib. pip install -e .[gpu]
    "gpu": ["jax[cuda12]==0.10.2"],
    # Cloud TPU VMs: libtpu matching jaxlib. pip install -e .[tpu]
    "tpu": ["jax[tpu]==0.10.2"],
    # llama.cpp GGUF files (init_from=gguf:FILE, GGUF tokenizers). pip install -e .[gguf]
    "gguf": ["gguf==0.19.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "chex==0.1.92"],
}

setup(
    name="rlhf_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
