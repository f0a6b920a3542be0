"""REGINA.def: Apptainer cannot run here, so the definition is parsed (spython) and linted.

Checks what breaks a build or a cluster run without anyone noticing: unknown sections, shell
syntax errors in the scripts, undeclared build arguments, %files sources that do not exist,
installing anything but the project itself, caches on the read-only image.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from spython.main.parse.parsers import SingularityParser

REPO = Path(__file__).resolve().parents[1]
DEFINITION = REPO / "REGINA.def"

# Sections Apptainer (>= 1.2) accepts; `app*` sections belong to SCIF apps.
KNOWN_SECTIONS = {
    "arguments", "setup", "files", "environment", "post", "runscript", "startscript", "test",
    "labels", "help", "appfiles", "appinstall", "appenv", "apphelp", "applabels", "apprun",
    "apptest", "appstart",
}
SCRIPT_SECTIONS = ("setup", "post", "environment", "runscript", "startscript", "test")
TEMPLATE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def read_definition() -> tuple[dict[str, str], dict[str, str]]:
    """(header, sections): `Bootstrap`/`From` lines, and each `%section` body as raw text."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in DEFINITION.read_text().splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1).lower()
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip().lower()] = value.strip()
    return header, {name: "\n".join(lines) for name, lines in sections.items()}


def build_arguments(sections: dict[str, str]) -> dict[str, str]:
    pairs = [line.strip().split("=", 1) for line in sections.get("arguments", "").splitlines() if "=" in line]
    return {key.strip(): value.strip() for key, value in pairs}


def rendered(text: str, arguments: dict[str, str]) -> str:
    """What Apptainer builds from: `{{ NAME }}` replaced by the %arguments default."""
    return TEMPLATE.sub(lambda m: arguments[m.group(1)], text)


@pytest.fixture(scope="module")
def recipe():
    return SingularityParser(str(DEFINITION)).recipe["spython-base"]


@pytest.fixture(scope="module")
def definition():
    return read_definition()


def test_spython_parses_a_cuda_runtime_base(recipe, definition):
    header, _ = definition
    assert header["bootstrap"] == "docker"
    assert recipe.fromHeader == header["from"]
    assert "cuda" in recipe.fromHeader and "runtime" in recipe.fromHeader
    assert any(label.startswith("org.opencontainers.image.title REGINA") for label in recipe.labels)


def test_only_known_sections_and_every_template_argument_declared(definition):
    _, sections = definition
    unknown = set(sections) - KNOWN_SECTIONS
    assert not unknown, f"sections Apptainer does not know: {sorted(unknown)}"
    for required in ("files", "environment", "post", "runscript", "test", "labels", "help"):
        assert sections.get(required, "").strip(), f"%{required} is missing or empty"
    used = set(TEMPLATE.findall(DEFINITION.read_text()))
    undeclared = used - set(build_arguments(sections))
    assert not undeclared, f"{{{{ }}}} arguments without a default in %arguments: {sorted(undeclared)}"


@pytest.mark.parametrize("section", [s for s in SCRIPT_SECTIONS if s in read_definition()[1]])
def test_script_sections_are_valid_bash(definition, section):
    _, sections = definition
    script = rendered(sections[section], build_arguments(sections))
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, f"%{section}: {check.stderr}"


def copied_files(recipe) -> dict[str, str]:
    """%files as {source in the repository: destination in the image}."""
    pairs = [line.split() for line in recipe.files]
    assert all(len(pair) == 2 for pair in pairs), f"%files lines must be 'source destination': {recipe.files}"
    return dict(pairs)


def test_files_come_from_the_repository_and_carry_what_the_build_needs(recipe):
    files = copied_files(recipe)
    for source in files:
        assert (REPO / source).exists(), f"%files copies {source}, which is not in the repository"
    assert "regina_cli" in files, "the package itself is not copied"
    assert "examples" in files, "the pipeline that %test runs is not copied"
    project = str(Path(files["pyproject.toml"]).parent)
    assert files["regina_cli"] == f"{project}/regina_cli"
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    if readme:
        assert files.get(readme.group(1)) == f"{project}/{readme.group(1)}", "pyproject's readme is not copied"


def pip_installs(post: str) -> list[list[str]]:
    """The arguments after `pip install` of every pip call in %post, options removed."""
    calls = []
    post = TEMPLATE.sub(lambda m: f"ARG:{m.group(1)}", post)
    for line in post.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) >= 2 and words[0].endswith("pip") and words[1] == "install":
            args, skip_next = [], False
            for word in words[2:]:
                if skip_next:
                    skip_next = False
                elif word in ("--index-url", "-i", "--extra-index-url", "-c", "--constraint"):
                    skip_next = True
                elif not word.startswith("-"):
                    args.append(word)
            calls.append(args)
    return calls


def test_install_step_installs_the_project_itself(recipe, definition):
    _, sections = definition
    project = str(Path(copied_files(recipe)["pyproject.toml"]).parent)
    calls = pip_installs(sections["post"])
    assert [project] in calls, f"%post never runs `pip install {project}`"
    # Everything else pip installs is pip itself or torch chosen by a build argument: the
    # dependencies come from pyproject.toml, never from a list kept here.
    for args in calls:
        if args == [project]:
            continue
        assert all(a in ("pip", "ARG:TORCH") for a in args), f"hand-kept packages: {args}"
    assert "regina --version" in sections["post"], "the build should prove the entry point works"


def test_runtime_environment_and_entry_point(recipe):
    environ = dict(item.split("=", 1) for item in recipe.environ)
    for cache in ("NUMBA_CACHE_DIR", "MPLCONFIGDIR"):  # a fixed /tmp folder is the first user's on a shared node
        assert cache not in environ, f"{cache}: regina_cli.private_dirs makes a private one where needed"
    assert "/opt/venv/bin" in environ["PATH"]
    assert environ.get("PYTHONNOUSERSITE") == "1"
    assert recipe.cmd == 'exec regina "$@"'


def test_self_test_runs_help_and_a_cpu_smoke_pipeline(definition):
    _, sections = definition
    test = sections["test"]
    assert "regina --help" in test
    smoke = re.search(r'CUDA_VISIBLE_DEVICES=""(.*?)bash (\S+) demo', test, re.S)
    assert smoke, "%test must run the demo pipeline on the CPU"
    assert smoke.group(2).endswith("/examples/pipeline.sh")
    assert "MAX_EPOCHS=" in smoke.group(1), "the smoke run must be capped to a few epochs"


def test_the_copied_files_alone_build_the_package(recipe, tmp_path):
    """What %files puts in the image is enough for `pip install /opt/regina` (built offline here)."""
    image = tmp_path / "image"
    for source, destination in copied_files(recipe).items():
        target = image / destination.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / source, target)
    project = image / str(Path(copied_files(recipe)["pyproject.toml"]).parent).lstrip("/")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(project)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "regina_cli/cli/__init__.py" in names
    resources = [p.relative_to(REPO).as_posix() for p in (REPO / "regina_cli" / "resources").glob("*")]
    assert set(resources) <= set(names), "package data missing from the image's install"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "regina = regina_cli.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
