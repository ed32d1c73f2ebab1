"""Parameters: config/recon.yaml lists every declared parameter with its default; a running node exposes
them all with descriptions over the ROS parameter services; overrides reach the pipeline config; a bad
value ends the node with one line and exit 2."""
import subprocess

import pytest
import yaml

pytest.importorskip('rclpy')
from rcl_interfaces.srv import DescribeParameters, ListParameters  # noqa: E402

from dynrecon_ros.ros.parameters import CONFIG_AT_NODE_LEVEL, NODE_PARAMETERS, PIPELINE_PREFIX, ros_value, pipeline_defaults  # noqa: E402
from dynrecon_ros.ros.params_file import params_yaml  # noqa: E402
from dynrecon_ros.ros.testing import ROOT, NodeProcess, RosHarness, domain_id_for, node_command, node_env  # noqa: E402

DOMAIN = domain_id_for(__name__)


def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f'{prefix}{k}.'))
        else:
            out[prefix + k] = v
    return out


def expected_parameters():
    want = {k: d for k, (d, _) in NODE_PARAMETERS.items()}
    want.update({PIPELINE_PREFIX + k: ros_value(d) for k, (d, _) in pipeline_defaults().items()
                 if k not in CONFIG_AT_NODE_LEVEL})
    want['use_sim_time'] = False
    return want


def test_recon_yaml_lists_every_parameter_with_its_default():
    doc = yaml.safe_load((ROOT / 'config' / 'recon.yaml').read_text())
    got = flat(doc['/**']['ros__parameters'])
    assert got == expected_parameters()
    assert (ROOT / 'config' / 'recon.yaml').read_text() == params_yaml(), 'regenerate: python -m dynrecon_ros.ros.params_file config/recon.yaml'


def test_running_node_declares_and_describes_all_and_applies_overrides():
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command(['--params-file', str(ROOT / 'config' / 'recon.yaml'),
                                     '-p', 'pipeline.window.size:=6', '-p', 'pipeline.map.voxel_size:=1',
                                     '-p', 'backend:=rgbd']), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        names = ros.call(ros.client(ListParameters, '/dynrecon/list_parameters'), ListParameters.Request()).result.names
        want = expected_parameters()
        assert set(want) <= set(names)
        req = DescribeParameters.Request(names=list(want))
        desc = ros.call(ros.client(DescribeParameters, '/dynrecon/describe_parameters'), req).descriptors
        missing = [d.name for d in desc if not d.description and d.name != 'use_sim_time']
        assert not missing, missing
        log = proc.output()
        line = next(ln for ln in log.splitlines() if 'pipeline settings changed from the defaults' in ln)
        assert "window.size=6" in line and "map.voxel_size=1.0" in line and "backend.name='rgbd'" in line, line
    finally:
        proc.stop()
        ros.close()


def test_bad_parameter_value_is_one_line_exit_2():
    res = subprocess.run(node_command(['-p', 'pipeline.window.size:=many']), env=node_env(DOMAIN), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert 'window' in res.stderr and 'size' in res.stderr and 'Traceback' not in res.stderr


def test_unknown_executor_is_one_line_exit_2():
    res = subprocess.run(node_command(['-p', 'executor:=threads']), env=node_env(DOMAIN), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "executor must be one of 'events', 'single'" in res.stderr and 'threads' in res.stderr
    assert 'Traceback' not in res.stderr
