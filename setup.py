"""ament_python package ovseg_ros; the interfaces live in msg/ (package ovseg_interfaces)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ovseg_ros"


def data_tree(folder: str) -> list[tuple[str, list[str]]]:
    """Install every file under folder into share/ovseg_ros/<folder>, keeping sub-folders."""
    entries: dict[str, list[str]] = {}
    for path in sorted(glob(f"{folder}/**/*", recursive=True)):
        if "__pycache__" in path or not _is_file(path):
            continue
        target = f"share/{PACKAGE}/" + path.rsplit("/", 1)[0]
        entries.setdefault(target, []).append(path)
    return list(entries.items())


def _is_file(path: str) -> bool:
    import os

    return os.path.isfile(path)


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["tests", "tests.*"]),
    package_data={PACKAGE: ["model_configs/*.json", "model_configs/sed/*.json", "model_configs/ovsam/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        *data_tree("launch"),
        *data_tree("config"),
        *data_tree("models"),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="ovseg_ros maintainers",
    maintainer_email="maintainers@ovseg-ros.dev",
    description="Open-vocabulary segmentation for ROS 2 (CLIP dense segmenter + Open-Vocabulary SAM prompts).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "ovseg_node = ovseg_ros.node:main",
            "synthetic_camera = ovseg_ros.synthetic_camera:main",
            "ovseg-demo = ovseg_ros.demo:main",
            "ovseg-models = ovseg_ros.core.registry:main",
            "ovseg = ovseg_ros.cli:main",
            "ovseg-bench = ovseg_ros.bench.__main__:main",
        ],
    },
)
