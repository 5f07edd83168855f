"""Dependency ranges: where we override a private API, the range is capped, and what is installed lies in it."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
# the packages whose private API we override: peft's RankAllocator (allocator.py), the Trainer's checkpoint
# methods (trainer_checkpoints.py), IVON's sampling, restore and update (ivon_inplace.py)
PRIVATE_API = ("peft", "transformers", "ivon-opt")


def requirement(name: str) -> Requirement:
    block = PYPROJECT.split("dependencies = [", 1)[1].split("]", 1)[0]
    lines = [Requirement(m) for m in re.findall(r'^\s*"([^"]+)"', block, re.MULTILINE)]
    return next(r for r in lines if r.name == name)


@pytest.mark.parametrize("name", PRIVATE_API)
def test_a_package_whose_private_api_we_override_is_capped_and_installed_within_its_range(name):
    spec = requirement(name).specifier
    assert any(s.operator == "<" for s in spec), f"{name} has no upper bound: {spec}"
    assert any(s.operator == ">=" for s in spec), f"{name} has no floor: {spec}"
    assert version(name) in spec, f"the installed {name} {version(name)} lies outside {spec}"


def test_the_floors_file_pins_each_floor():
    pins = dict(line.split("==") for line in
                (Path(__file__).resolve().parents[1] / ".ci" / "floors.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in (*PRIVATE_API, "torch", "accelerate", "datasets", "pyyaml"):
        floor = next(s.version for s in requirement(name).specifier if s.operator == ">=")
        assert pins[name].startswith(floor), f"{name}: floors.txt pins {pins[name]}, pyproject's floor is {floor}"
