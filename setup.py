"""Package list for the fixed layout: cluster/ and actors/ install as expertmesh.cluster and
expertmesh.actors, protos/expertmesh as expertmesh (so generated stubs import as expertmesh.v1)."""
from setuptools import find_packages, setup

ROOTS = {"expertmesh": "protos/expertmesh", "expertmesh.cluster": "cluster", "expertmesh.actors": "actors"}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages())
