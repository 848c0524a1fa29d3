import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from spawn import alive, descendants
from torch.utils.data import TensorDataset

from batteries import make_loader
from batteries.distributed import DistributedTrainSampler

LOADING = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch.utils.data import Dataset
    from batteries import make_loader

    class Slow(Dataset):
        def __len__(self):
            return 10_000
        def __getitem__(self, index):
            time.sleep(0.01)
            return torch.zeros(2)

    if __name__ == "__main__":
        for index, _ in enumerate(make_loader(Slow(), 4, num_workers=2)):
            if index == 1:
                print("loading", flush=True)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_run_leaves_no_worker_or_server_behind(tmp_path, sig):
    script = tmp_path / "loading.py"
    script.write_text(LOADING)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "loading"
        helpers = descendants(process.pid)
        assert len(helpers) >= 3  # the forkserver, its two workers (and the resource tracker)
        process.send_signal(sig)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(helpers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(helpers) == [], "processes of the killed run are still alive"
    finally:
        for pid in alive(descendants(process.pid)):
            os.kill(pid, signal.SIGKILL)
        process.kill()


def test_loader_draws_nothing_from_the_global_rng_and_repeats():
    dataset = TensorDataset(torch.arange(20.0))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    orders = []
    for _ in range(2):
        sampler = DistributedTrainSampler(dataset, seed=3)
        loader = make_loader(dataset, 6, sampler=sampler, seed=3)
        orders.append([batch[0].tolist() for batch in loader])
    assert orders[0] == orders[1] and sorted(sum(orders[0], [])) == list(range(20))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("kwargs", "error"), [({"batch_size": 0}, ValueError), ({"num_workers": 1.0}, TypeError)])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        make_loader(TensorDataset(torch.zeros(2)), **{"batch_size": 1, **kwargs})
