"""AFD executors reproduce single-device greedy decode token for token (8 fake CPU devices).

Oracle: `oracles.reference_step_fn`, i.e. `Step3Model` layer by layer with the FFN input
passed through the same FP8 transfer quantization (identity when the flag is off); with the
flag off it is checked against `step3_jax.decode.generate` itself. Float32 params and
activations, highest matmul precision (tests/conftest.py), ragged prompts of 1-8 tokens.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracles
import pytest
from flax import nnx

from step3_jax.config import Step3Config
from step3_jax.decode import generate
from step3_jax.model import Step3Model
from step3_jax.policy import KernelPolicy
from step3_jax.sharding import arena_io
from step3_jax.sharding.afd import AfdConfig, AfdExecutor
from step3_jax.sharding.baseline import BaselineExecutor
from step3_jax.sharding.layout import ALIGN, AfdLayout, ArenaDtypes
from step3_jax.sharding.reference import ReferenceExecutor

pytestmark = pytest.mark.multi_device
MAX_LEN, NEW = 64, 4
SEQS_PER_ATTENTION_DEVICE = 6  # divisible by every micro-batch count 1, 2, 3
F32 = ArenaDtypes("float32", "float32", "float32", "float32")
FAST_COMPILE = (("xla_backend_optimization_level", 0),)  # ~3x faster CPU compiles
REF = KernelPolicy.reference()  # XLA attention and linears, the dense MoE oracle


@functools.cache
def tiny_model():
    cfg = Step3Config.tiny()
    return Step3Model(
        cfg,
        rngs=nnx.Rngs(0),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        policy=REF,
    )


def prompts(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 512, n))) for n in rng.integers(1, 9, batch)]


@functools.cache
def oracle_tokens(batch: int, fp8: bool) -> np.ndarray:
    step = oracles.reference_step_fn(tiny_model(), batch, MAX_LEN, fp8)
    return oracles.greedy_generate(step, prompts(batch), NEW)


def test_oracle_without_fp8_is_generate():
    got = generate(tiny_model(), prompts(6), NEW, max_cache_len=MAX_LEN)
    np.testing.assert_array_equal(np.array(got.tokens), oracle_tokens(6, False))


# (layout, ffn_ep, micro-batches, fp8 transfer); every layout x every micro-batch count, FP8
# transfer both on and off. The four unmarked cases cover each layout once (~1 min on 2
# cores); the `slow` rest (~2 min) completes the matrix.
_SLOW = pytest.mark.slow
CASES = [
    ("1A1F", None, 1, False),
    pytest.param("1A1F", None, 2, True, marks=_SLOW),
    pytest.param("1A1F", None, 3, True, marks=_SLOW),
    pytest.param("1A3F", 1, 1, True, marks=_SLOW),
    pytest.param("1A3F", 1, 2, False, marks=_SLOW),
    ("1A3F", 1, 3, True),
    pytest.param("2A2F", None, 1, True, marks=_SLOW),
    ("2A2F", None, 2, True),
    pytest.param("2A2F", None, 3, False, marks=_SLOW),
    pytest.param("2A6F", 2, 1, False, marks=_SLOW),
    pytest.param("2A6F", 2, 2, True, marks=_SLOW),
    ("2A6F", 2, 3, True),
]


@pytest.mark.parametrize("name,ep,mbs,fp8", CASES)
def test_compiled_afd_matches_single_device(name, ep, mbs, fp8):
    lay = AfdLayout.parse(name, ffn_ep=ep)
    batch = lay.num_attention * SEQS_PER_ATTENTION_DEVICE
    afd = AfdConfig(
        SEQS_PER_ATTENTION_DEVICE // mbs,
        mbs,
        MAX_LEN,
        fp8_transfer=fp8,
        policy=REF,
        compiler_options=FAST_COMPILE,
    )
    ex = AfdExecutor(
        tiny_model().config,
        lay,
        jax.devices()[: lay.num_devices],
        afd,
        dtypes=F32,
        act_dtype=jnp.float32,
    )
    ex.load_model(tiny_model())
    got = oracles.greedy_generate(ex.step, prompts(batch), NEW)
    np.testing.assert_array_equal(got, oracle_tokens(batch, fp8))
    assert ex._program._cache_size() == 2  # one program for the prefill, one for all decodes


def test_compiled_afd_logits_close_and_fp8_flag_matters():
    """Logits differ from the oracle only by summation order: partial expert sums added
    across FFN devices. f32 rounding ~6e-8 relative per add, a few adds per layer, 4 layers,
    |logit| <~ 2: bound 1e-5 absolute; the FP8 transfer moves logits ~1e-2 (2^-4 relative
    steps on the FFN input), so the flag is visibly live."""
    model, lay = tiny_model(), AfdLayout.parse("2A2F")
    toks, lengths = oracles.pad_prompts(prompts(12))
    pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
    out = {}
    for fp8 in (False, True):
        ex = AfdExecutor(
            model.config,
            lay,
            jax.devices()[:4],
            AfdConfig(3, 2, MAX_LEN, fp8_transfer=fp8, policy=REF, compiler_options=FAST_COMPILE),
            dtypes=F32,
            act_dtype=jnp.float32,
        )
        ex.load_model(model)
        out[fp8] = np.asarray(ex.step(toks, pos, lengths - 1))
        ref = oracles.reference_step_fn(model, 12, MAX_LEN, fp8)(toks, pos, lengths - 1)
        np.testing.assert_allclose(out[fp8], np.asarray(ref), atol=1e-5, rtol=0)
    assert np.max(np.abs(out[True] - out[False])) > 1e-3


@pytest.mark.parametrize("name,ep", [("2A6F", 2)])
def test_device_put_reference_matches_single_device(name, ep):
    lay = AfdLayout.parse(name, ffn_ep=ep)
    batch = lay.num_attention * 3
    ex = ReferenceExecutor(
        tiny_model(),
        lay,
        jax.devices()[: lay.num_devices],
        batch=batch,
        max_len=MAX_LEN,
        fp8_transfer=True,
    )
    got = oracles.greedy_generate(ex.step, prompts(batch), NEW)
    np.testing.assert_array_equal(got, oracle_tokens(batch, True))


def test_baseline_matches_single_device():
    ex = BaselineExecutor(
        tiny_model().config,
        jax.devices()[:4],
        batch=12,
        max_len=MAX_LEN,
        fp8_transfer=True,
        act_dtype=jnp.float32,
        policy=REF,
        dtypes=F32,
    )
    ex.load_model(tiny_model())
    got = oracles.greedy_generate(ex.step, prompts(12), NEW)
    np.testing.assert_array_equal(got, oracle_tokens(12, True))


def test_bad_inputs_are_clear_errors():
    cfg, lay = tiny_model().config, AfdLayout.parse("2A2F")
    afd = AfdConfig(3, 2, MAX_LEN)
    with pytest.raises(ValueError, match="needs exactly 4 devices, got 3"):
        AfdExecutor(cfg, lay, jax.devices()[:3], afd)
    ex = AfdExecutor(cfg, lay, jax.devices()[:4], afd, dtypes=F32, act_dtype=jnp.float32)
    with pytest.raises(ValueError, match="load_model"):
        ex.step(np.zeros((12, 1)), np.zeros((12, 1)), np.zeros(12))
    ex.load_model(tiny_model())
    with pytest.raises(ValueError, match=r"tokens must be \[B=12, T\]"):
        ex.step(np.zeros((8, 1)), np.zeros((8, 1)), np.zeros(8))
    with pytest.raises(ValueError, match="KernelPolicy.moe"):
        AfdConfig(3, 2, MAX_LEN, policy=KernelPolicy(moe="magic"))


def test_no_arena_sized_copy_in_compiled_step():
    """The memory design's promise: the arena is updated in place, never copied."""
    model, lay = tiny_model(), AfdLayout.parse("1A1F")
    ex = AfdExecutor(
        model.config,
        lay,
        jax.devices()[:2],
        AfdConfig(2, 2, MAX_LEN),
        dtypes=F32,
        act_dtype=jnp.float32,
    )
    ex.load_model(model)
    hlo = ex.compiled().as_text()
    arena = f"f32[{ex.arena.sizes['float32'] // ALIGN},{ALIGN}]"
    copies = [ln for ln in hlo.splitlines() if arena in ln and " copy(" in ln]
    assert not copies, copies[:3]


def test_grouped_ffn_reads_experts_in_place_exactly():
    """The grouped-GEMM FFN reading the routed experts in place from the arena gives exactly
    the logits of the same FFN on sliced copies (same operands, same kernel), stays close to
    the dense FFN (the grouped XLA path rounds operands to bf16: relative ~2**-8 per product,
    so logits move ~1e-2 at most on this 4-layer model), and the compiled step holds no copy
    of a layer's experts."""
    model, lay = tiny_model(), AfdLayout.parse("2A2F")  # 2 experts-parallel FFN devices
    toks, lengths = oracles.pad_prompts(prompts(8))
    pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
    out, hlo = {}, {}
    for impl, in_place in (("grouped", True), ("grouped", False), ("dense", True)):
        ex = AfdExecutor(
            model.config,
            lay,
            jax.devices()[:4],
            AfdConfig(
                2,
                2,
                MAX_LEN,
                policy=KernelPolicy(attention="xla", moe="xla" if impl == "grouped" else "dense"),
                experts_in_place=in_place,
                compiler_options=FAST_COMPILE,
            ),
            dtypes=F32,
            act_dtype=jnp.float32,
        )
        ex.load_model(model)
        hlo[impl, in_place] = ex.compiled().as_text()
        out[impl, in_place] = np.asarray(ex.step(toks, pos, lengths - 1))
    np.testing.assert_array_equal(out["grouped", True], out["grouped", False])
    np.testing.assert_allclose(out["grouped", True], out["dense", True], atol=3e-2)
    e, f, d = ex.arena.ffn["moe/ffn.gate_proj"].shape
    layer_experts = f"f32[{e},{f},{d}]"  # a sliced copy of one layer's gate/up experts
    assert layer_experts in hlo["grouped", False]  # the control does copy
    assert layer_experts not in hlo["grouped", True]


def test_attention_reads_the_cache_in_place():
    """``KernelPolicy(attention=None)`` reads the FP8 KV cache in place (paged kernel API
    with per-operand page offsets into the arena; on CPU its XLA reference gathers those
    pages): the logits match the sliced-cache XLA attention. Both see the same bf16
    activations and FP8 cache; they differ in attention code (kernel reference vs the model's
    XLA attention, f32 softmax in both), so only bf16-level noise remains."""
    model, lay = tiny_model(), AfdLayout.parse("1A1F")
    toks, lengths = oracles.pad_prompts(prompts(4, seed=3))
    pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
    out, exs = {}, {}
    # (attention implementation, V^T-tiled arena cache: the FP8 P.V layout)
    for impl, vt in (("xla", False), (None, False), (None, True)):
        dtypes = ArenaDtypes("float32", "float32", "float32", "float8_e4m3fn", v_transposed=vt)
        ex = AfdExecutor(
            model.config,
            lay,
            jax.devices()[:2],
            AfdConfig(
                2,
                2,
                MAX_LEN,
                policy=KernelPolicy(attention=impl, moe="dense"),
                compiler_options=FAST_COMPILE,
            ),
            dtypes=dtypes,
            act_dtype=jnp.bfloat16,
        )
        ex.load_model(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no Hopper GPU, using the XLA implementation"
            first = np.asarray(ex.step(toks, pos, lengths - 1))
            nxt = np.argmax(first, -1)[:, None].astype(np.int32)
            second = np.asarray(ex.step(nxt, lengths[:, None], np.zeros(4, np.int32)))
        out[impl, vt] = np.stack([first, second])
        exs[impl, vt] = ex
    ex = exs[None, False]  # the token-major arena, for the exact check below
    a, b = out["xla", False], out[None, False]
    # The V^T-tiled arena holds the same FP8 bytes, read as 64-token pages: the same logits up
    # to the reference's gather/summation order.
    np.testing.assert_allclose(out[None, True], b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    # The model's XLA attention rounds the dequantized K/V to bf16 (2**-9 relative), the
    # kernel reference keeps f32: bf16-level differences through 4 bf16 layers.
    cos = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
    assert cos > 0.995, cos
    # The exact check: the in-place read returns bitwise what the same attention returns on
    # sliced copies of the same item (a wrong page offset would read another item).
    arenas = {
        t: jax.random.normal(jax.random.key(i), (n // ALIGN, ALIGN)).astype(t)
        for i, (t, n) in enumerate(ex.arena.sizes.items())
    }
    q = jax.random.normal(jax.random.key(9), (2, 1, 4, 32)).astype(jnp.bfloat16)
    qpos = jnp.asarray([[5], [40]], jnp.int32)
    from step3_jax.kernels.mfa_decode import mfa_decode_attention

    for item in (0, 3, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")

            def attend(arenas, q, qpos, item=item):
                cache = arena_io.ArenaKVCache(arenas, ex.arena.attention, item, 2)
                return cache.attend(0, q, qpos, None)

            got = jax.jit(attend)(arenas, q, qpos)
            regs = ex.arena.attention
            k, v, ks, vs = (arena_io.view(arenas, regs[n], item) for n in arena_io.CACHE_REGIONS)
            want = mfa_decode_attention(
                q, k, v, qpos[:, 0] + 1, k_scale=ks, v_scale=vs, implementation="xla"
            )
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _conditionals(ex: AfdExecutor) -> int:
    hlo = ex.compiled().as_text()
    return sum(" conditional(" in ln for ln in hlo.splitlines())


def test_one_role_programs_run_only_their_own_work():
    """A one-role program (what `bench_afd.py --role` times) keeps only the ticks where its
    role works, in schedule order, with each tick's branch static: the FFN role compiles to no
    conditional at all, the attention role on CPU to one (the q/k/v one that orders the arena reads
    before the in-place KV write); the full program adds ONE switch per tick. With the exchange
    gone, a one-role program still does all its role's work: the attention role's packet (the
    router's output included) is stored as a receive would store it."""
    model, lay = tiny_model(), AfdLayout.parse("1A1F")
    cfg, m = model.config, 2
    afd = AfdConfig(2, m, MAX_LEN, policy=REF, compiler_options=FAST_COMPILE)
    kinds = ["moe" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_layers)]
    assert len(set(kinds)) == 2  # the tiny model has both FFN kinds
    conds = {}
    for role in ("attention", "ffn"):
        ex = AfdExecutor(cfg, lay, jax.devices()[:1], afd, dtypes=F32, role=role)
        segments = ex._segments()
        rows = np.concatenate([r for _, r in segments])
        ok = 0 if role == "attention" else 3
        assert rows[:, ok].all() and len(rows) == cfg.num_layers * m
        full = ex.schedule[ex.schedule[:, ok] > 0]
        np.testing.assert_array_equal(rows, full)  # schedule order kept
        for name, seg in segments:
            layer = seg[:, ok + 1]
            want = ["attention"] * len(seg) if role == "attention" else [
                f"ffn_{kinds[i]}" for i in layer
            ]  # fmt: skip
            assert [name] * len(seg) == want
        ex.load_random()
        hlo = ex.compiled().as_text()
        conds[role] = sum(" conditional(" in ln for ln in hlo.splitlines())
        if role == "attention":  # its messages stay live: the router is not dead code
            assert "/router/" in hlo and "top_k" in hlo
    ex = AfdExecutor(cfg, lay, jax.devices()[:2], afd, dtypes=F32, act_dtype=jnp.float32)
    ex.load_model(model)
    assert ex._segments()[0][0] is None and len(ex._segments()) == 1
    # On a GPU the attention role orders q/k/v with a barrier instead (no conditional).
    assert conds == {"attention": 1 if jax.devices()[0].platform != "gpu" else 0, "ffn": 0}
    assert _conditionals(ex) == 4  # embed and head (once per step), q/k/v and the role switch


def test_lm_head_rows_padded_for_any_vocabulary():
    """The arena's lm_head holds `head_rows(V)` rows (a multiple of 8, zero-padded: cuBLAS
    then reads it in place); the step's logits are still exactly ``[B, V]`` and equal the
    oracle's for a vocabulary that is not a multiple of 8."""
    import dataclasses

    from step3_jax.sharding.layout import head_rows

    cfg = dataclasses.replace(Step3Config.tiny(), vocab_size=509)
    model = Step3Model(
        cfg, rngs=nnx.Rngs(1), dtype=jnp.float32, param_dtype=jnp.float32, policy=REF
    )
    lay = AfdLayout.parse("1A1F")
    ex = AfdExecutor(
        cfg,
        lay,
        jax.devices()[:2],
        AfdConfig(2, 1, MAX_LEN, fp8_transfer=False, policy=REF, compiler_options=FAST_COMPILE),
        dtypes=F32,
        act_dtype=jnp.float32,
    )
    assert head_rows(509) == 512 and ex.arena.attention["lm_head"].shape == (512, cfg.hidden_size)
    ex.load_model(model)
    toks, lengths = oracles.pad_prompts([[5, 7, 11], [3]])
    pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
    got = np.asarray(ex.step(toks, pos, lengths - 1))
    ref = oracles.reference_step_fn(model, 2, MAX_LEN, False)(toks, pos, lengths - 1)
    assert got.shape == (2, 509)
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-5, rtol=0)
