"""Package build. The C++ CPU ops in csrc/ are added here by the CPU-speed work."""

from setuptools import setup

setup()
