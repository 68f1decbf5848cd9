from setuptools import setup

setup(
    name="minbert",
    version="0.1.0",
    description="A hand-written BERT for CS224N multi-task fine-tuning (SST, Quora, STS) that loads real "
                "Hugging Face checkpoints",
    # one top-level name: the folders beside minbert/ are its subpackages (minbert/__init__.py does the same in a
    # checkout), and the programs train.py and evaluate.py are minbert.training.train and minbert.training.evaluate
    packages=["minbert", "minbert.heads", "minbert.optim", "minbert.data", "minbert.training"],
    package_dir={"minbert": "minbert", **{f"minbert.{name}": name for name in ("heads", "optim", "data", "training")}},
    package_data={"minbert.data": ["tasks.json"]},  # the CS224N tasks' entries
    python_requires=">=3.10",
    # install torch first (`pip install torch==2.13.0` here, or the CUDA build on a GPU machine): this range
    # is then satisfied and pip fetches nothing more
    install_requires=["torch>=2.3", "numpy", "scipy", "tokenizers>=0.15", "safetensors>=0.4", "tqdm"],
    extras_require={
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],  # --report_to tensorboard
        "wandb": ["wandb"],  # --report_to wandb
        # transformers, peft and sentence-transformers are reference oracles for the tests only; the library never
        # imports them
        "test": ["pytest", "transformers>=4.40", "peft>=0.10", "sentence-transformers>=3.0", "matplotlib",
                 "nbclient", "ipykernel", "nbformat", "tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["minbert-train=minbert.training.train:main",
                                      "minbert-evaluate=minbert.training.evaluate:main"]},
)
