"""mimdistill: MAE pre-training, TinyMIM distillation and fine-tuning in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name="mimdistill",
  version="0.1.0",
  description=(
    "Masked-image-modeling pre-training (MAE), TinyMIM relation "
    "distillation and fine-tuning of vision Transformers in JAX/Flax."
  ),
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.10",
  packages=find_packages(include=["mimdistill", "mimdistill.*"]),
  install_requires=[
    "jax>=0.4.30",
    "flax>=0.8.5",
    "optax>=0.2.2",
    "orbax-checkpoint>=0.6.0",
    "tensorflow-datasets>=4.9.6",
    "grain>=0.2.2",
    "array-record>=0.5.1",
    "ml-collections>=0.1.1",
    "numpy>=1.24",
    "pillow>=10.0",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "matplotlib>=3.7",
    "absl-py>=1.4",
    # Local or gs:// paths for workdirs (mimdistill.paths); [epath]
    # brings fsspec, which serves the buckets.
    "etils[epath]>=1.5",
    # tensorflow-datasets imports it when preparing datasets but does
    # not declare it.
    "importlib_resources>=5.0",
  ],
  extras_require={
    "test": [
      "pytest>=7.4",
      "ruff>=0.6",
      "pytest-timeout>=2.2",
      # The suite runs one worker per core (pytest.ini), each test file in one worker.
      "pytest-xdist>=3.5",
      # tests/test_notebook.py executes launch/colab/quickstart.ipynb
      "nbclient>=0.7",
      "nbformat>=5.7",
      "ipykernel>=6.0",
    ],
    # Running launch/colab/quickstart.ipynb outside Colab.
    "notebook": ["jupyterlab>=4.0", "ipykernel>=6.0"],
    # gs:// workdirs: epath reaches buckets through gcsfs; Orbax also
    # asks google-cloud-storage about the bucket's layout.
    "gcs": ["gcsfs", "google-cloud-storage"],
    # launch/sky/*.yaml: TPU pods and GPU clusters as SkyPilot managed jobs.
    "sky": ["skypilot[gcp]>=0.9"],
  },
)
