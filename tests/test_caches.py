"""Cache directories (:mod:`bidsapp.caches`): this user's alone, in the work directory when the
default is not writable, and never an exit 1 for a read-only ``/tmp`` or home."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bidsapp import caches
from bidsapp.caches import CACHES, TMPDIR, fallback_root, prepare_caches
from bidsapp.demo import make_demo_dataset
from bidsapp.errors import CannotCreateOutputError, ExitCode

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
#: What the image sets (Dockerfile ENV): every cache under /tmp.
IMAGE_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "MPLCONFIGDIR": "/tmp/matplotlib",
             "NILEARN_DATA": "/tmp/nilearn_data", "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor",
             "TRITON_CACHE_DIR": "/tmp/triton", "CUDA_CACHE_PATH": "/tmp/nv-cache",
             "DENO_DIR": "/tmp/deno"}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No cache variable set; a writable home of this test's; returns the work directory."""
    for variable in (*CACHES, TMPDIR, "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", None)   # restored after the test
    return tmp_path / "work"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writable_defaults_and_settings_are_kept(env: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine" / "matplotlib"))
    assert prepare_caches(env) == {}
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine" / "matplotlib")
    assert _mode(tmp_path / "mine" / "matplotlib") == 0o700   # created, for this user only
    for variable in set(CACHES) - {"MPLCONFIGDIR"}:
        assert variable not in os.environ, variable              # the library's default stays
    assert not (tmp_path / "home" / "nilearn_data").exists()     # and is not created here
    assert not env.exists()


def test_unwritable_directories_move_into_the_work_directory(env: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A path under a regular file cannot be created, even by root (ENOTDIR).
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("HOME", str(blocked / "home"))
    monkeypatch.setenv("MPLCONFIGDIR", str(blocked / "matplotlib"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocked / "inductor"))
    moved = prepare_caches(env)
    root = fallback_root(env)
    assert root == env / f"caches-uid{os.getuid()}"
    # The home-based defaults move too; the inductor's default would be in the temp directory.
    assert moved == {variable: root / name for variable, name in CACHES.items()}
    for variable, path in moved.items():
        assert os.environ[variable] == str(path)
        assert _mode(path) == 0o700, variable
    assert _mode(root) == 0o700
    assert prepare_caches(env) == moved   # a second call changes nothing


def test_world_writable_or_another_users_directory_is_not_used(
        env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared-matplotlib"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("MPLCONFIGDIR", str(shared))
    (tmp_path / "home").mkdir()
    assert prepare_caches(env) == {"MPLCONFIGDIR": fallback_root(env) / "matplotlib"}
    if os.geteuid() != 0:
        return   # only root can make a directory another user's
    theirs = tmp_path / "their-inductor"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    assert prepare_caches(env)["TORCHINDUCTOR_CACHE_DIR"] == fallback_root(env) / "torchinductor"


def test_no_usable_temp_directory_moves_tmpdir(env: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "home").mkdir()
    monkeypatch.setattr(caches, "_tempdir_usable", lambda: False)
    moved = prepare_caches(env)
    tmp = fallback_root(env) / "tmp"
    assert moved[TMPDIR] == tmp and os.environ[TMPDIR] == str(tmp)
    assert tempfile.gettempdir() == str(tmp)
    # torch's default inductor folder is in the temp directory: usable, hence left unset.
    assert "TORCHINDUCTOR_CACHE_DIR" not in moved


def test_an_unusable_fallback_stops_with_exit_73_and_what_to_do(
        env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "a-file" / "matplotlib"))
    (tmp_path / "a-file").write_text("")
    env.mkdir()
    fallback_root(env).write_text("")   # in the way of the fallback folder
    with pytest.raises(CannotCreateOutputError) as raised:
        prepare_caches(env)
    assert raised.value.exit_code == ExitCode.CANNOT_CREATE_OUTPUT == 73
    message = str(raised.value)
    assert "\n" not in message
    assert "MPLCONFIGDIR" in message and str(fallback_root(env)) in message
    if os.geteuid() != 0:
        return
    fallback_root(env).unlink()
    fallback_root(env).mkdir(mode=0o700)
    os.chown(fallback_root(env), NOBODY, NOBODY)   # planted by another user
    with pytest.raises(CannotCreateOutputError, match="belongs to another user"):
        prepare_caches(env)


def _can_run_as_nobody() -> str | None:
    """Why a command cannot run as user nobody here, or None."""
    if os.geteuid() != 0:
        return "needs root (to start a process as user nobody)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) not installed"
    return None


def test_two_users_never_share_a_cache(request: pytest.FixtureRequest) -> None:
    """Root makes /shared/matplotlib its own; nobody, given the same setting, gets its own."""
    reason = _can_run_as_nobody()
    if reason:
        pytest.skip(reason)
    # Outside pytest's base folder, which is private (0700) to the user running the tests.
    shared = Path(tempfile.mkdtemp(prefix="roimae-shared-"))
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    shared.chmod(0o1777)   # like /tmp
    env = {**os.environ, "MPLCONFIGDIR": str(shared / "matplotlib"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from pathlib import Path; from bidsapp.caches import prepare_caches; "
            "print(prepare_caches(Path(sys.argv[1])).get('MPLCONFIGDIR', 'kept'))")
    mine = subprocess.run([sys.executable, "-c", code, str(shared / "work-root")], env=env,
                          capture_output=True, text=True, check=True)
    assert mine.stdout.strip() == "kept"
    assert _mode(shared / "matplotlib") == 0o700
    theirs = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             sys.executable, "-c", code, str(shared / "work-nobody")],
                            env={**env, "HOME": str(shared)}, cwd=shared, capture_output=True,
                            text=True, check=False)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout.strip() == str(shared / "work-nobody" / f"caches-uid{NOBODY}" / "matplotlib")
    assert (shared / "work-nobody" / f"caches-uid{NOBODY}").stat().st_uid == NOBODY


# --- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bids = tmp_path_factory.mktemp("caches") / "bids"
    make_demo_dataset(bids, n_participants=4, n_frames=20, seed=0)
    return bids


def _pretrain(bids: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "bidsapp", str(bids), str(root / "out"), "pretrain",
            "-w", str(root / "work"), "--epochs", "1", "--window-frames", "10", "--batch-size", "2",
            "--device", "cpu", "--omp-nthreads", "1"]


def _check_pretrained(done: subprocess.CompletedProcess, root: Path) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert (root / "out" / "models" / "desc-roi" / "model.safetensors").is_file()
    assert (root / "out" / "models" / "desc-roi" / "loss_curve.png").is_file()   # matplotlib
    fallback = root / "work" / f"caches-uid{os.getuid()}"
    assert _mode(fallback) == 0o700
    assert any((fallback / "matplotlib").iterdir())   # its font cache
    assert "default directories are not writable" in done.stderr


@pytest.mark.slow
def test_the_cli_runs_when_no_cache_directory_is_writable(dataset: Path, tmp_path: Path) -> None:
    """Home, TMPDIR and every cache variable under a regular file: the caches move, exit 0."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = {**os.environ, **{v: str(blocked / v.lower()) for v in (*CACHES, "HOME", "TMPDIR",
                                                                 "XDG_CACHE_HOME")},
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(_pretrain(dataset, tmp_path), env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    _check_pretrained(done, tmp_path)


def _read_only_tmp_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace with /tmp read-only)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                          capture_output=True, text=True, check=False)
    return f"cannot unshare the mount namespace: {done.stderr.strip()}" if done.returncode else None


@pytest.mark.slow
def test_the_cli_runs_with_a_read_only_tmp_as_in_a_container(dataset: Path, tmp_path: Path) -> None:
    """``docker run --read-only`` without ``--tmpfs /tmp``: exit 1 (matplotlib) before the fix."""
    reason = _read_only_tmp_reason()
    if reason:
        pytest.skip(reason)
    # /tmp and /var/tmp read-only (and the current directory, tempfile's last resort); this
    # test's directory stays writable as the output and work directories.
    script = ('set -e; mount --bind /tmp /tmp; mount -o remount,bind,ro /tmp; '
              'mount --bind "$0" "$0"; mount -o remount,bind,rw "$0"; '
              'mount -t tmpfs -o ro tmpfs /var/tmp; cd /tmp; exec "$@"')
    env = {**os.environ, **IMAGE_ENV, "TMPDIR": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           str(tmp_path), *_pretrain(dataset, tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    _check_pretrained(done, tmp_path)
    assert (tmp_path / "work" / f"caches-uid{os.getuid()}" / "tmp").is_dir()   # TMPDIR too
