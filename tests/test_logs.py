"""lacd.logs.quiet_torchao: torchao's import noise is dropped in every lacd process, and nothing else."""

from __future__ import annotations

import enum
import logging
import subprocess
import sys

import pytest
import torch

import lacd  # noqa: F401 - installs the filters
from lacd.child import child_env

# What the train child imports before its first step: the trainer, then peft (which imports
# transformers' model classes, and they import torchao whenever it is installed).
TRAIN_CHILD_IMPORTS = """
import sys
import lacd.pipeline.train
from peft import LoraConfig, get_peft_model
print("torchao" in sys.modules)
"""


def test_importing_the_trainer_and_peft_writes_nothing_to_stderr():
    done = subprocess.run([sys.executable, "-c", TRAIN_CHILD_IMPORTS], env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # torchao was imported: the noise had its chance
    assert done.stderr == ""


class Local(enum.Enum):
    A = 1


# An Enum whose module is torchao's (as KernelPreference's is), made without importing torchao.
TorchaoEnum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common.kernel_preference")
KERNEL = "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load"
CUTLASS = "Failed to load /venv/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load"
PYTREE = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."


@pytest.mark.parametrize("cuda, logger, msg, arg, shown", [
    (None, "torchao", KERNEL, None, False),
    (None, "torchao", CUTLASS, None, False),
    ("13.0", "torchao", KERNEL, None, True),  # a CUDA torch loads them: their failure is a real mismatch
    (None, "torchao", "Failed to load /venv/site-packages/torchao/_C.abi3.so: Could not load", None, True),
    (None, "torchao", "Skipping import of cpp extensions due to incompatible torch version.", None, True),
    (None, "torch.utils._pytree", PYTREE, TorchaoEnum, False),
    (None, "torch.utils._pytree", PYTREE, Local, True),
], ids=["mxfp8", "cutlass", "mxfp8-cuda-torch", "other-kernel", "other-warning", "torchao-enum", "other-enum"])
def test_only_torchaos_cuda_kernels_on_a_cpu_torch_and_its_enums_are_dropped(monkeypatch, cuda, logger, msg, arg,
                                                                             shown):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    args = (arg,) if arg is not None else ()
    record = logging.getLogger(logger).makeRecord(logger, logging.WARNING, __file__, 1, msg, args, None)
    assert bool(logging.getLogger(logger).filter(record)) is shown
