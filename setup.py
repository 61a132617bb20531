from setuptools import find_packages, setup

setup(
    name="valleyforge",
    version="0.1.0",
    description="Distributed two-stage training of video/image-language assistant models",
    python_requires=">=3.10",
    packages=find_packages(include=["data_shards*", "trainer*", "launch*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "peft>=0.13",
        "ray[train,default]>=2.50",
        "mlflow>=3.0",
        "av>=12",
        "pillow",
        "numpy",
        "pydantic>=2",
        "pyyaml",
        "safetensors",
        "fsspec",
        "pyarrow",  # Ray Train reaches cluster.storage through a pyarrow filesystem
        "psutil",  # the nodes' system metrics
        "tqdm",
        "tokenizers",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "cloud": ["s3fs", "gcsfs"],
        # tests read our shards with the webdataset library and run an S3-compatible store (moto)
        "dev": ["pytest>=8", "ruff>=0.17", "webdataset>=0.2.100", "moto[server]>=5", "s3fs"],
    },
    entry_points={"console_scripts": ["valleyforge=launch.cli:main"]},
)
