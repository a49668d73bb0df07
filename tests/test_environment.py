"""environment.yml and constraints.txt agree with setup.cfg, the one list of dependencies."""
import configparser
import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def normalised(name: str) -> str:
    """PEP 503: case and runs of -_. do not matter (open_clip_torch == open-clip-torch)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(lines) -> dict[str, Requirement]:
    """name -> Requirement for requirement lines (comments, blanks and pip options such as -e dropped)."""
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()
            and not line.strip().startswith("-")]
    return {normalised(r.name): r for r in reqs}


def setup_cfg_requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in ("crf", "dev"):
        lines += cfg["options.extras_require"][extra].splitlines()
    return requirements(lines)


def environment_pip_lines() -> list[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return pip


def test_environment_yml_names_the_dependencies_of_setup_cfg():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["name"] == "lightning_clipes"
    assert "pip" in env["dependencies"] and any(str(d).startswith("python=3.11") for d in env["dependencies"])
    pip = environment_pip_lines()
    assert pip[-1] == "-e ."  # the package itself, after its dependencies
    listed, declared = requirements(pip), setup_cfg_requirements()
    assert sorted(listed) == sorted(declared), "environment.yml and setup.cfg name different packages"
    for name, req in declared.items():  # same bounds and extras too, so the two cannot drift apart
        assert (listed[name].specifier, listed[name].extras) == (req.specifier, req.extras), name


def test_constraints_pin_every_dependency_within_setup_cfg_bounds():
    lines = (REPO / "constraints.txt").read_text().splitlines()
    body = [line for line in lines if line.strip() and not line.startswith("#")]
    assert body and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;@/]+", line) for line in body), \
        "constraints.txt holds only name==version lines: no -e, no paths, no URLs"
    pins = {normalised(line.split("==")[0]): Version(line.split("==")[1]) for line in body}
    assert len(pins) == len(body), "a package is pinned twice"
    for name, req in setup_cfg_requirements().items():
        assert name in pins, f"constraints.txt does not pin {name}; regenerate it (see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks setup.cfg's {req}"
    assert "torch" in pins and "lightning" in pins
