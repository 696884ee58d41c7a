"""Test-suite setup: 8 fake CPU devices, float32 matmuls on CPU, GPU/multi-device markers."""

import os

# Must happen before jax is imported anywhere: multi-device tests run on 8 fake CPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# On a GPU, each pytest-xdist worker would otherwise preallocate 75% of the device memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a GPU (run on the GPU machine)")
    skip_devices = pytest.mark.skip(reason="needs 8 devices (8 fake CPU devices off-GPU)")
    enough_devices = len(jax.devices()) >= 8
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "multi_device" in item.keywords and not enough_devices:
            item.add_marker(skip_devices)
