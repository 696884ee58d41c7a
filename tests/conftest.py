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
    # `slow` tests first (a stable sort: the rest keep pytest's order). With the work-stealing
    # scheduler below, a 2-4 minute test then starts at the beginning of the run instead of
    # keeping one worker busy alone at its end (measured: ~4 minutes of one idle core).
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # xdist hook; absent with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` without ``--dist``: work stealing instead of xdist's ``load``. ``load`` hands
    out fixed chunks of consecutive tests, so the slow tests (sorted first) would all land on
    one worker; work stealing gives an idle worker half of the busiest one's queue."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import WorkStealingScheduling

    return WorkStealingScheduling(config, log)
