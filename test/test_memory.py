"""dynrecon_ros.memory: keeping freed heap (glibc mallopt) stops image-sized temporaries page-faulting."""
import subprocess
import sys

import pytest

from dynrecon_ros.memory import MALLOPT

SCRIPT = '''
import resource, sys
import numpy as np
from dynrecon_ros.memory import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap()
rng = np.random.default_rng(0)
a = rng.random((240, 320), dtype=np.float32)
def step():  # a chain of image-sized temporaries, freed at the end (as a segmentation step makes them)
    t = [a * 2]
    for _ in range(6):
        t.append(t[-1] + a)
    return float(t[-1][0, 0])
step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
'''


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, '-c', SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(MALLOPT is None, reason='no glibc mallopt on this platform')
def test_keep_freed_heap_stops_page_faults_of_image_sized_temporaries():
    default, kept = _faults('default'), _faults('keep')
    # glibc's default hands the freed heap top back each step: ~75 faults per 300 KB array
    assert default > 500
    assert kept < 0.05 * default
