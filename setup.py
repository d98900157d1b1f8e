from glob import glob

from setuptools import find_packages, setup

package_name = "tdnet_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=[package_name, f"{package_name}.*"]),
    package_data={package_name: ["models/*.pt"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", glob("launch/*.py")),
        (f"share/{package_name}/config", glob("config/*")),
        (f"share/{package_name}/msg", glob("msg/*.msg")),
    ],
    install_requires=["numpy", "torch", "pyyaml"],
    zip_safe=False,
    maintainer="tdnet_ros team",
    maintainer_email="tdnet-ros@example.com",
    description="TDNet video semantic segmentation for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "tdnet-bench = tdnet_ros.cli.bench:main",
            "tdnet-build-engines = tdnet_ros.cli.build_engines:main",
            "tdnet-demo = tdnet_ros.cli.demo:main",
            "segmenter_node = tdnet_ros.ros.entry:main",
            "tdnet-eval = tdnet_ros.cli.evaluate:main",
            "tdnet-generate = tdnet_ros.cli.generate:main",
            "tdnet-train = tdnet_ros.cli.train:main",
            "tdnet-recipe = tdnet_ros.cli.recipe:main",
        ],
    },
)
