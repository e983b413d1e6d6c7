"""Packaging stays in one piece: the conda env's pip pins equal pyproject's, torch's range is the
supported one, every install reads constraints.txt (the versions CI tested), and CI runs exactly
the test command the README gives."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_requirements() -> list[str]:
    project = pyproject()["project"]
    return list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))


def conda_pip_requirements() -> list[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_blocks = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_blocks) == 1, "environment.yml needs exactly one pip: block"
    # Installing the package itself is not a requirement of it.
    return [r for r in pip_blocks[0] if not str(r).startswith(("-e ", "--editable", ".", "-c "))]


def normalised(reqs: list[str]) -> list[str]:
    return sorted(str(Requirement(r)) for r in reqs)


def test_environment_pins_equal_pyproject():
    ours, conda = project_requirements(), conda_pip_requirements()
    assert len(set(normalised(ours))) == len(ours), f"duplicate requirement in pyproject: {ours}"
    assert len(set(normalised(conda))) == len(conda), f"duplicate requirement in environment.yml: {conda}"
    assert normalised(conda) == normalised(ours)
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "pip" in env["dependencies"], "environment.yml must install pip before its pip: block"
    assert any(str(r) in ("-e .", "--editable .") for d in env["dependencies"] if isinstance(d, dict)
               for r in d.get("pip", [])), "environment.yml should install the package itself (-e .)"


@pytest.mark.parametrize("source", ["pyproject.toml", "environment.yml"])
def test_torch_range_admits_2_13_and_excludes_2_14(source):
    reqs = project_requirements() if source == "pyproject.toml" else conda_pip_requirements()
    torch_reqs = [Requirement(r) for r in reqs if Requirement(r).name == "torch"]
    assert len(torch_reqs) == 1, f"{source}: expected one torch requirement, got {torch_reqs}"
    spec: SpecifierSet = torch_reqs[0].specifier
    assert spec.contains("2.13.0"), f"{source}: torch{spec} must admit 2.13.0"
    for excluded in ("2.14.0", "2.14.1", "3.0.0"):
        assert not spec.contains(excluded), f"{source}: torch{spec} must exclude {excluded}"


def test_python_requirement_matches_environment():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"python[=<>]", d)]
    assert len(pythons) == 1, pythons
    version = re.split(r"[=<>]+", pythons[0], maxsplit=1)[1]
    assert requires.contains(version + ".0" if version.count(".") == 1 else version)


# --------------------------------------------------------------------------- constraints.txt
def constraints() -> dict[str, str]:
    """``{normalised name: version}`` of constraints.txt's ``name==version`` lines."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonical(req.name)] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_requirement_inside_its_range():
    """The tested versions: every dependency and extra is pinned, at a version pyproject admits,
    and so is everything they pull in (followed through the installed packages' metadata)."""
    from importlib import metadata

    pins = constraints()
    extras = pyproject()["project"].get("optional-dependencies", {})
    todo = [Requirement(r) for r in [*pyproject()["project"]["dependencies"], *(r for reqs in extras.values() for r in reqs)]]
    for req in todo:
        assert canonical(req.name) in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), f"constraints.txt: {req.name}=={pins[canonical(req.name)]} outside {req}"
    seen = set()
    while todo:
        req = todo.pop()
        if canonical(req.name) in seen:
            continue
        seen.add(canonical(req.name))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an extra this environment did not install (CI installs dev only)
        assert canonical(req.name) in pins, f"constraints.txt does not pin {req.name}, which the install pulls in"
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(sub)
    assert pins["torch"] == "2.13.0"


def test_every_install_reads_the_constraints():
    install = re.compile(r"pip install (?:-c constraints\.txt -e|-e .* -c constraints\.txt)")
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert install.search(ci), ".ci/run must install with -c constraints.txt"
    assert install.search(readme), "the README's install must use -c constraints.txt"
    assert not re.search(r"pip install -e", readme), "an install in the README skips constraints.txt"
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-c constraints.txt" in pip_block


# --------------------------------------------------------------------------- README <-> .ci/run
def readme_test_command(text: str) -> list[str]:
    """The command lines of the first fenced block under the first heading containing 'Test'."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"#{1,6}\s.*\btests?\b", line, re.I)), None)
    if start is None:
        return []
    body, fence = [], None
    for line in lines[start + 1:]:
        if fence is None:
            if re.match(r"#{1,6}\s", line):
                break  # next heading before any code block
            match = re.match(r"\s*(```|~~~)", line)
            if match:
                fence = match.group(1)
            continue
        if line.strip().startswith(fence):
            break
        body.append(line)
    commands = []
    for line in body:
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def script_commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_parser_on_an_example():
    example = "# x\n\n## Tests\n\nRun:\n\n```bash\n$ python -m pytest -q\n```\n\n## Other\n```\nno\n```\n"
    assert readme_test_command(example) == ["python -m pytest -q"]


def test_ci_runs_the_readme_test_command():
    readme, ci = REPO / "README.md", REPO / ".ci" / "run"
    if not readme.is_file() or not ci.is_file():
        pytest.skip("README.md or .ci/run not written yet")
    commands = readme_test_command(readme.read_text())
    assert commands, "README.md needs a heading containing 'Test' followed by a fenced test command"
    script = script_commands(ci.read_text())
    for command in commands:
        assert command in script, f".ci/run must run the README's test command verbatim: {command!r}\n{script}"
    assert any(shlex.split(c)[:3] == ["python", "-m", "pytest"] or "pytest" in shlex.split(c)[:3]
               for c in commands), f"the README's test command does not run pytest: {commands}"


def test_lightning_is_pinned_below_2_7_while_adicli_replaces_a_private_hook():
    """adi_lightning.cli.ADICLI overrides LightningCLI._parse_ckpt_path (2.6 merges a checkpoint's
    hyperparameters over typed flags with it): the installed lightning must still call it, and
    both pin files stop below the next minor (tests/test_ckpt_settings.py tests the behaviour)."""
    import inspect

    from lightning.pytorch.cli import LightningCLI

    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
    for source, reqs in (("pyproject.toml", project_requirements()), ("environment.yml", conda_pip_requirements())):
        (spec,) = [Requirement(r).specifier for r in reqs if Requirement(r).name == "lightning"]
        assert "2.6.9" in spec and "2.7.0" not in spec, f"{source}: lightning{spec}"
