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


MAX_LINES = 600


def test_no_module_over_600_lines():
    over = {str(p.relative_to(ROOT)): n for p in PKG.rglob('*.py')
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, f'modules over {MAX_LINES} lines: {over}'


# geometry lives in dynrecon_ros/geometry.py only: no SVD-based fit, Rodrigues, skew matrix, pixel grid or
# unprojection written again elsewhere
GEOMETRY_NAMES = {'hat', 'skew', 'so3_exp', 'se3_exp', 'se3_exp_left', 'se3_increment', 'rodrigues', 'umeyama',
                  'kabsch', 'batched_kabsch', 'procrustes', 'weighted_procrustes', 'robust_procrustes',
                  'procrustes_batch', 'lqs_similarity', 'svd_rotation', 'rigid_from_moments', 'pixel_grid',
                  'unproject', 'transform', 'transform_points', 'pose_from_tum', 'poses_from_tum',
                  'tum_rows_to_poses'}


def test_geometry_is_written_once():
    found = []
    for p in PKG.rglob('*.py'):
        rel = str(p.relative_to(ROOT))
        if rel == 'dynrecon_ros/geometry.py':
            continue
        for node in ast.walk(ast.parse(p.read_text(), filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = node.name
                if name.lstrip('_') in GEOMETRY_NAMES or name.lstrip('_').startswith('fit_'):
                    found.append(f'{rel}:{node.lineno} def {name}')
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'svd':
                found.append(f'{rel}:{node.lineno} {ast.unparse(node.func)}(...)')
    assert not found, f'geometry written outside dynrecon_ros/geometry.py (use it from there): {found}'
