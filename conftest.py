"""pytest setup shared by tests/ and notebooks/ (nbval): the number of CPU threads per test process."""

import os

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `pytest -n N`: split the cores between the N workers, and the notebook kernels each worker starts
    # (they inherit this environment). N processes each using every core would fight for them: on a 2-core
    # machine with -n 2, notebooks 11-16 + two test files took 297 s with the default threads, 42 s with one each.
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
