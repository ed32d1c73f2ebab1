"""Package layout rules: the core library never imports rclpy; ROS metadata is complete."""
import ast
import pathlib
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / 'dynrecon_ros'
ROS_ONLY = {'rclpy', 'rosidl_runtime_py', 'tf2_ros', 'tf2_msgs', 'sensor_msgs', 'geometry_msgs',
            'nav_msgs', 'std_msgs', 'std_srvs', 'rosgraph_msgs', 'cv_bridge', 'sensor_msgs_py',
            'launch', 'launch_ros', 'builtin_interfaces'}


def _imported_roots(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split('.')[0])
    return roots


def test_core_modules_do_not_import_ros():
    core = [p for p in PKG.rglob('*.py') if 'ros' not in p.relative_to(PKG).parts[:1]]
    assert len(core) >= 3
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_roots(p) & ROS_ONLY) for p in core}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f'core modules importing ROS packages: {offenders}'


def test_ros_adapter_is_where_rclpy_lives():
    ros_files = list((PKG / 'ros').rglob('*.py'))
    assert ros_files, 'dynrecon_ros/ros/ must exist'


def test_package_xml_declares_runtime_dependencies():
    root = ET.parse(ROOT / 'package.xml').getroot()
    assert root.get('format') == '3'
    assert root.findtext('name') == 'dynrecon_ros'
    assert root.find('export/build_type').text == 'ament_python'
    deps = {e.text for e in root.findall('exec_depend')}
    for needed in ('rclpy', 'std_msgs', 'sensor_msgs', 'geometry_msgs', 'nav_msgs', 'tf2_msgs',
                   'cv_bridge', 'sensor_msgs_py'):
        assert needed in deps, needed
    assert (ROOT / 'resource' / 'dynrecon_ros').exists()


def test_setup_installs_share_files_and_console_scripts():
    text = (ROOT / 'setup.py').read_text()
    for needed in ("'share/ament_index/resource_index/packages'", "launch/*.launch.py", "config/*.yaml",
                   "'recon_node = dynrecon_ros.ros.node:main'", "'dynrecon = dynrecon_ros.cli:main'"):
        assert needed in text, needed


def test_parameter_table_is_importable_without_rclpy():
    """The node's parameter table (and the params file writer) serve docs and tests on machines without ROS."""
    for name in ('parameters.py', 'params_file.py'):
        roots = _imported_roots(PKG / 'ros' / name)
        assert not roots & ROS_ONLY, f'dynrecon_ros/ros/{name} imports {sorted(roots & ROS_ONLY)}'
