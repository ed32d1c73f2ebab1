#!/usr/bin/env bash
# Download into .whl/ the Python wheels the GPU benches (bench/gpu.sh) need that the device image lacks.
#
# The device machine (see docs/GPU.md) runs Python 3.12 with CUDA torch, numpy, scipy,
# opencv-python-headless, einops, matplotlib, pyyaml, tqdm, pillow, pandas, seaborn, colorama,
# packaging, pygments, typing-extensions. Traced imports of bench/network.py, bench/monocular.py,
# bench/monocular_host.py and bench/alignment.py (CPU runs, sys.modules at exit): the only
# third-party module missing there is evo (dynrecon_ros.evaluation, imported by bench/alignment.py
# for the ATE), and scikit-learn and scikit-image (dynrecon_ros.attention_segmentation: Easi3R's
# k-means and multi-level Otsu, bench/monocular.py's attention / both modes) with their
# Requires-Dist closure minus what the image has (networkx comes with torch). The rest of the list is
# evo's Requires-Dist closure minus what the image has
# (argcomplete, natsort, numexpr, rosbags -> apsw, backports.zstd, lz4, ruamel.yaml), so that
# `pip check` is clean; none of those is imported by the benches. transforms3d is not imported by
# any bench (not carried). Versions: requirements.txt's pins (evo, rosbags), else those its pins
# resolved to in the dev venv. One version of each (two stop the install).
#
# Usage (in the repo root, on a machine with pip and a package index): bash tools/device_wheels.sh
# Then carry `.whl` in the device call (docs/GPU.md). PIP=... selects the pip (default: python3 -m pip).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

PIP=${PIP:-python3 -m pip}
WHEELS=(
  evo==1.38.1            # pure; requirements.txt pin
  argcomplete==3.7.2     # pure; evo
  natsort==8.4.0         # pure; evo
  numexpr==2.14.2        # cp312 manylinux; evo
  rosbags==0.11.9        # pure; evo; requirements.txt pin
  ruamel.yaml==0.19.1    # pure; rosbags
  lz4==4.4.5             # cp312 manylinux; rosbags
  apsw==3.54.1.0         # cp312 manylinux; rosbags
  backports.zstd==1.8.0  # cp312 manylinux; rosbags (python < 3.14)
  scikit-learn==1.9.1    # cp312 manylinux; requirements.txt pin
  joblib==1.6.0          # pure; scikit-learn
  cloudpickle==3.1.3     # pure; joblib
  threadpoolctl==3.8.0   # pure; scikit-learn
  narwhals==2.29.0       # pure; scikit-learn
  scikit-image==0.26.0   # cp312 manylinux; requirements.txt pin
  imageio==2.38.2        # pure; scikit-image
  tifffile==2026.3.3     # pure; scikit-image
  lazy-loader==0.6       # pure; scikit-image
)
rm -rf .whl && mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  plat+=(--platform "$p")
done
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl "${WHEELS[@]}"
# one wheel per requested name, nothing else
n=$(ls .whl/*.whl | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels in .whl, got $n:" >&2; ls .whl >&2; exit 1
fi
ls -l .whl
du -sh .whl
