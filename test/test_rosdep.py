"""`rosdep install --from-paths src --ignore-src -y` as the README runs it, offline against the snapshot of
rosdep's database in ../shared/ros/rosdep (ROS 2 Kilted, Ubuntu Noble): every key of package.xml resolves,
to apt packages (pip keys would make rosdep run `pip install -U` system-wide, which Noble's Python refuses,
PEP 668). Skipped, with the reason, without ../shared/ros or the stack `make setup` installs from it."""
import pytest
from catkin_pkg.package import parse_package

import ros_stack

pytestmark = pytest.mark.skipif(ros_stack.missing() is not None, reason=str(ros_stack.missing()))
OS = ['--os', 'ubuntu:noble']


@pytest.fixture(scope='module')
def rosdep(tmp_path_factory):
    """`rosdep ARGS` on the snapshot: a sources list naming its two yaml files, its rosdistro index, own cache."""
    tmp = tmp_path_factory.mktemp('rosdep')
    db = ros_stack.SHARED_ROS / 'rosdep'
    (tmp / 'sources.list.d').mkdir()
    (tmp / 'sources.list.d' / '20-snapshot.list').write_text(
        f"yaml {(db / 'base.yaml').as_uri()}\nyaml {(db / 'python.yaml').as_uri()}\n")
    (tmp / 'src').mkdir()
    (tmp / 'src' / 'dynrecon_ros').symlink_to(ros_stack.ROOT, target_is_directory=True)
    env = ros_stack.env(0, tmp / 'ros_home')  # ROS_HOME: rosdep's cache
    env.update(ROSDEP_SOURCE_PATH=str(tmp / 'sources.list.d'), ROS_DISTRO='kilted',
               ROSDISTRO_INDEX_URL=(db / 'rosdistro' / 'index-v4.yaml').as_uri())

    def run(*args):
        return ros_stack.run([str(ros_stack.VENV_BIN / 'rosdep'), *args], env, tmp)
    update = run('update')
    assert update.returncode == 0, update.stdout + update.stderr
    return run


def test_every_package_xml_key_resolves_to_apt(rosdep):
    pkg = parse_package(str(ros_stack.ROOT / 'package.xml'))
    keys = sorted({d.name for d in pkg.exec_depends + pkg.build_depends + pkg.buildtool_depends
                   + pkg.test_depends + pkg.build_export_depends})
    assert len(keys) > 20
    p = rosdep('resolve', *keys, *OS)
    assert p.returncode == 0, p.stdout + p.stderr  # "ERROR: no rosdep rule for 'python3-evo-pip'"
    # '#ROSDEP[key]' then '#installer' then the system packages, for each key
    lines = p.stdout.splitlines()
    resolved = {k[8:-1]: i[1:] for k, i in zip(lines, lines[1:]) if k.startswith('#ROSDEP[')}
    assert resolved == dict.fromkeys(keys, 'apt'), p.stdout

    # the README's command
    p = rosdep('install', '--from-paths', 'src', '--ignore-src', '-y', '--simulate', *OS)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'pip' not in p.stdout, p.stdout
