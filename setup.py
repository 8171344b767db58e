from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="pyvarinf2",
    version="0.1.0",
    description="Variational Bayesian deep learning for PyTorch: variationalize any nn.Module, "
                "Bayes-by-backprop and natural-gradient VI (noisy Adam, noisy K-FAC/EK-FAC, VOGN, IVON)",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="MIT",
    packages=find_packages(include=["pyvarinf2", "pyvarinf2.*"]),
    package_data={"pyvarinf2": ["datasets/*.txt", "datasets/*.csv", "configs/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1,<3",
        "numpy>=1.22",
        "scipy>=1.8",
        "tqdm>=4.60",
        "matplotlib>=3.5",
    ],
    extras_require={
        "vision": ["torchvision>=0.16"],
        "test": ["pytest>=7", "hypothesis>=6.50", "nbclient>=0.7", "nbformat>=5", "ipykernel>=6",
                 "tensorboard>=2.10"],
        "docs": ["sphinx>=6"],
        "tensorboard": ["tensorboard>=2.10"],
    },
    entry_points={"console_scripts": ["pyvarinf2=pyvarinf2.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
