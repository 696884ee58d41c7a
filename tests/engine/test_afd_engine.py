"""The engine drives the compiled AFD step (1A1F on 2 fake CPU devices) the way it drives the
single-device model: every request's greedy output equals `generate` decoding it alone, with
chunked prefill, queueing (more requests than rows) and requests coming and going, on two
compiled programs (T=1 and T=chunk). FP8 transfer off, float32: the AFD step equals the
model (tests/sharding/test_afd_equality.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CFG, build_model

from step3_jax.decode import generate
from step3_jax.engine import Engine, SamplingParams
from step3_jax.engine.afd_executor import AfdEngineExecutor
from step3_jax.policy import KernelPolicy
from step3_jax.sharding.afd import AfdConfig, AfdExecutor
from step3_jax.sharding.layout import AfdLayout, ArenaDtypes

pytestmark = pytest.mark.multi_device
F32 = ArenaDtypes("float32", "float32", "float32", "float32")
MAX_LEN, CHUNK = 40, 8


def test_afd_engine_greedy_equals_alone():
    model = build_model()
    afd = AfdConfig(
        3, 1, MAX_LEN + CHUNK, fp8_transfer=False, policy=KernelPolicy.reference(),
        compiler_options=(("xla_backend_optimization_level", 0),),
    )  # fmt: skip
    lay = AfdLayout.parse("1A1F")
    ex = AfdExecutor(CFG, lay, jax.devices()[:2], afd, dtypes=F32, act_dtype=jnp.float32)
    ex.load_model(model)
    engine = Engine(AfdEngineExecutor(ex, prefill_chunk=CHUNK))
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(1, CFG.vocab_size, n))) for n in (3, 13, 6, 9, 1)]
    new = [6, 4, 8, 5, 7]
    out = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in new])
    for req, p, n in zip(out, prompts, new, strict=True):
        want = generate(model, [p], n, max_cache_len=64).tokens[0]
        assert req.output == want
    assert engine.executor.compile_count() == 2
    with pytest.raises(ValueError, match="max_len=40 .AFD arena max_len 48 - prefill chunk 8"):
        engine.submit([1] * 30, SamplingParams(max_tokens=11))
