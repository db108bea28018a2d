"""Test-only: every Python process started with this folder on PYTHONPATH installs the CPU shim
first: the ranks that ``pop-nemo train --nproc 2`` starts under torchrun, in the end-to-end test.

Processes that run no megatron code skip it, as installing imports all of megatron.core (seconds
each): the launchers (``pop-nemo train --nproc N``, torchrun's agent) and ``python -c`` helpers
(multiprocessing's children, such as the Manager that megatron's checkpoint writer starts). The
launchers only get ``torch.cuda.current_device`` mapped to the CPU (the call
``pop_nemo.policies.megatron.runs_here`` probes), so that ``pop-nemo``'s check that the ranks can
run the Megatron policy (CUDA, or this shim) passes as it will in the ranks."""

import sys
from pathlib import Path

_LAUNCHER = {"--nproc", "--nproc-per-node", "--nproc_per_node"}
if sys.argv[:1] != ["-c"]:
    if _LAUNCHER & set(sys.argv):
        import torch

        if not torch.cuda.is_available():
            torch.cuda.current_device = lambda: 0  # what cpu_shim.install() maps, without the install
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

        from tests.megatron import cpu_shim

        cpu_shim.install()
