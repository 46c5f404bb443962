import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest_plugins = ["processor46_fixtures"]  # `ours` / `oracle` 4.6 processors for the preprocessing tests

# 2-core CI machines shared with other jobs: one thread keeps tiny-model timings steady and
# avoids OpenMP barrier stalls when a neighbour holds a core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny46_dir(tmp_path_factory):
    from tiny46 import build_tiny_46

    return build_tiny_46(tmp_path_factory.mktemp("tiny46"), seed=0)


@pytest.fixture(scope="session")
def tiny47_dense_dir(tmp_path_factory):
    from tiny47 import build_tiny_47

    return build_tiny_47(tmp_path_factory.mktemp("tiny47_dense"), moe=False, seed=0)


@pytest.fixture(scope="session")
def tiny47_moe_dir(tmp_path_factory):
    from tiny47 import build_tiny_47

    return build_tiny_47(tmp_path_factory.mktemp("tiny47_moe"), moe=True, seed=1)


@pytest.fixture(scope="session")
def tiny47_moe_fused_dir(tmp_path_factory):
    from tiny47 import build_tiny_47

    return build_tiny_47(tmp_path_factory.mktemp("tiny47_moe_fused"), moe=True, fused=True, seed=1)
