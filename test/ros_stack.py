"""The ROS 2 Kilted launch stack (`colcon`, `ros2 launch`, `ros2 node/param`, `rosdep`) as the tests use it.

`make setup` installs it into the venv from ``../shared/ros`` when that folder is there (CI always has it);
without it these tests skip, saying why. Everything runs as separate processes, as a user's shell would:
``source install/setup.bash`` of a colcon workspace, then ``ros2 ...``.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_ROS = pathlib.Path(os.environ.get('DYNRECON_SHARED') or ROOT.parent / 'shared') / 'ros'  # as shared_refs
VENV_BIN = pathlib.Path(sys.executable).parent
# node info / param get without the ROS daemon: let discovery finish (else "Node not found")
NO_DAEMON = ['--no-daemon', '--spin-time', '3']


def missing() -> str | None:
    """Why the launch stack cannot be used here, or None."""
    if not SHARED_ROS.is_dir():
        return f'{SHARED_ROS} is not there (CI has it): no ROS 2 launch stack, colcon or rosdep snapshot'
    for tool in ('ros2', 'colcon', 'rosdep'):
        if not (VENV_BIN / tool).exists():
            return f'{VENV_BIN / tool} is missing: run `make setup` (it installs the stack from {SHARED_ROS})'
    try:
        import composition_interfaces.srv  # noqa: F401 - launch_ros imports it at load time
    except ImportError:
        return 'composition_interfaces is not built: run `make setup`'
    return None


def env(domain_id: int, home: pathlib.Path) -> dict:
    """A user's shell on this venv: its bin first, its prefix as the ament/CMake prefix, own ROS_HOME."""
    e = dict(os.environ)
    e['PATH'] = os.pathsep.join([str(VENV_BIN), e.get('PATH', '/usr/bin:/bin')])
    e['AMENT_PREFIX_PATH'] = e['CMAKE_PREFIX_PATH'] = str(VENV_BIN.parent)
    e['ROS_DOMAIN_ID'] = str(domain_id)
    e['ROS_HOME'] = str(home)  # launch logs and rosdep's cache land here, not in ~/.ros
    e['PYTHONUNBUFFERED'] = '1'
    e['RCUTILS_COLORIZED_OUTPUT'] = '0'
    return e


def sourced(ws: pathlib.Path, cmd: list[str]) -> list[str]:
    """``cmd`` run after ``source ws/install/setup.bash``."""
    setup = shlex.quote(str(ws / 'install' / 'setup.bash'))
    return ['bash', '-c', f'source {setup} && exec "$@"', 'bash', *cmd]


def run(cmd: list[str], env: dict, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def colcon_build(ws: pathlib.Path, env: dict) -> subprocess.CompletedProcess:
    """This package (symlinked as ws/src/dynrecon_ros) built by `colcon build --packages-select dynrecon_ros`."""
    (ws / 'src').mkdir(parents=True, exist_ok=True)
    link = ws / 'src' / 'dynrecon_ros'
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    return run([str(VENV_BIN / 'colcon'), 'build', '--packages-select', 'dynrecon_ros'], env, ws, timeout=300)


def ros2(ws: pathlib.Path, env: dict, *args: str, timeout: float = 60) -> str:
    """stdout of ``ros2 ARGS`` in the sourced workspace; an AssertionError with stderr if it fails."""
    p = run(sourced(ws, ['ros2', *args]), env, ws, timeout=timeout)
    assert p.returncode == 0, f'ros2 {" ".join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}'
    return p.stdout


def node_info(text: str) -> dict[str, dict[str, str]]:
    """`ros2 node info` output as {section: {name: type}} (sections: Subscribers, Publishers, ...)."""
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        if re.match(r'^  \S.*:$', line):
            section = line.strip()[:-1]
            out[section] = {}
        elif section and line.startswith('    ') and ': ' in line:
            name, typ = line.strip().split(': ', 1)
            out[section][name] = typ
    return out


class Launch:
    """``ros2 launch ARGS`` in its own process group (as a terminal runs it), output to a file.

    Stopped like Ctrl-C: SIGINT to the group. (A background job of a non-interactive shell ignores SIGINT,
    and SIGTERM can leave the node orphaned: see docs/ROS.md.)
    """

    def __init__(self, ws: pathlib.Path, args: list[str], env: dict, log: pathlib.Path):
        self.log = log
        self._f = open(log, 'w')
        self.proc = subprocess.Popen(sourced(ws, ['ros2', 'launch', *args]), stdout=self._f,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(ws), start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors='replace')

    def wait_output(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        return text in self.output()

    def child_pids(self) -> list[int]:
        """The pids launch reports for the processes it started."""
        return [int(p) for p in re.findall(r'process started with pid \[(\d+)\]', self.output())]

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGINT to the group; the launch's exit code, or None if it had to be killed."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                return None
            except ProcessLookupError:
                pass
        self._f.close()
        return self.proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f'/proc/{pid}/stat')
    return not (stat.exists() and stat.read_text().split(') ', 1)[-1].startswith('Z'))
