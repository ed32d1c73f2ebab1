"""ament_python package setup: `colcon build` on a ROS 2 Jazzy/Kilted install, or `pip install -e .`.

Python dependencies are pinned in requirements.txt (the one place); package.xml names the rosdep keys.
"""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'dynrecon_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'bench', 'tools']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml') + glob('config/*.xml')),
        (f'share/{PACKAGE}/rviz', glob('rviz/*.rviz')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='dynrecon developers',
    maintainer_email='dev@dynrecon.invalid',
    description='Dynamic-scene-aware 3D reconstruction for ROS 2 (DUSt3R/MonST3R-style).',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'dynrecon = dynrecon_ros.cli:main',
            'recon_node = dynrecon_ros.ros.node:main',
        ],
    },
)
