"""Fixtures shared by the 4.6 image and video preprocessing tests: our processor and
transformers' (the oracle), both built from the real 4.6 files."""
import shutil

import pytest

from minicpmv.processing import Processor46
from paths import FIXTURE_46


@pytest.fixture(scope="module")
def ours():
    return Processor46.from_pretrained(FIXTURE_46)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("fx46")
    shutil.copytree(FIXTURE_46, folder, dirs_exist_ok=True)
    return transformers.AutoProcessor.from_pretrained(str(folder))
