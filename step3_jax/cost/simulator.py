"""AFD pipeline simulator: TPOT and tokens/s/GPU for an xAyF layout we cannot rent.

The model is the paper's (arXiv 2507.19427, section 7.1, Figure 7): every layer, each
micro-batch goes through four FIFO resources in order,

    A (attention GPUs) -> A->F link (FP8 tokens) -> F (FFN GPUs) -> F->A link (BF16 back)

and micro-batch j's layer l+1 attention waits for its layer-l FFN result. `simulate` plays that
schedule event by event for several consecutive decode steps (micro-batch j of step t+1 starts
when its step-t token is out), so pipeline fill, drain and the cross-step overlap are all in the
steady-state TPOT it reports; nothing is approximated by a closed form.

Stage times come either from measurements (`load_measured`, schema below) or from the roofline
(`analytic_layer_times`): ``max(flops / (peak * eff.compute), bytes / (bw * eff.memory))`` per
stage, one `Efficiency` for the whole system (calibrate it ONCE, never per run).

Measured-times JSON schema accepted by `load_measured` (``*_us_per_layer`` are per layer per
micro-batch, microseconds; a scalar means every layer, a list gives each layer):

    {"device": str, "jax_version": str, "commit": str, "date": str,      # provenance, optional
     "runs": [                                                            # or one run at top level
       {"name": str,                         # optional label
        "layout": "1A1F",                    # xAyF; "gpus_per_instance" (default 1 here)
        "gpus_per_instance": 1,
        "num_layers": 61,                    # needed when every *_us_per_layer is a scalar; <= 1000
        "micro_batches": 3,                  # <= 64 (the simulation plays L x M x steps events)
        "batch": 384,                        # total sequences in flight (all micro-batches)
        "attn_us_per_layer": 80.0 | [...],   # every time finite and >= 0, not all 0
        "ffn_us_per_layer": 120.0 | [...],
        "transfer_us_per_layer": 30.0 | [...],   # one direction; or a2f_us_/f2a_us_per_layer
        "step_overhead_us": 0.0,             # optional: embedding, LM head, sampling per step
        "measured_step_ms": 18.5}]}          # optional: the measured TPOT to compare with
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from step3_jax.config import Step3Config, is_int
from step3_jax.cost import analytic
from step3_jax.cost.hardware import HardwareSpec
from step3_jax.cost.specs import ModelSpec, from_step3_config

_RESOURCES = ("A", "A->F", "F", "F->A")
# Bounds of a measured run (`parse_run`), far above any real one (Step-3: 61 layers, 3
# micro-batches): the event loop is O(layers x micro-batches), so a typo must not hang it.
MAX_LAYERS = 1000
MAX_MICRO_BATCHES = 64


def _check_times(name: str, values, unit: str) -> None:
    """Every time finite and >= 0 (NaN fails ``< 0`` comparisons, so test it explicitly)."""
    bad = next((v for v in values if not (math.isfinite(v) and v >= 0)), None)
    if bad is not None:
        raise ValueError(f"{name} must be finite and >= 0 {unit}, got {bad}")


@dataclasses.dataclass(frozen=True)
class LayerTimes:
    """Per-layer stage times in seconds for ONE micro-batch; each tuple has one entry per layer."""

    attn_s: tuple[float, ...]
    a2f_s: tuple[float, ...]
    ffn_s: tuple[float, ...]
    f2a_s: tuple[float, ...]
    step_overhead_s: float = 0.0  # per decode step on the attention side (embed, head, sample)

    def __post_init__(self):
        n = len(self.attn_s)
        for f in ("attn_s", "a2f_s", "ffn_s", "f2a_s"):
            v = tuple(float(x) for x in getattr(self, f))
            object.__setattr__(self, f, v)
            if len(v) != n or n == 0:
                raise ValueError(f"LayerTimes.{f}: need one entry per layer ({n}), got {len(v)}")
            _check_times(f"LayerTimes.{f}", v, "seconds")
        _check_times("step_overhead_s", (self.step_overhead_s,), "seconds")
        stages = (self.attn_s, self.a2f_s, self.ffn_s, self.f2a_s)
        if self.step_overhead_s == 0 and not any(any(v) for v in stages):
            # A step would take 0 s: TPOT 0, and every rate divides by it.
            raise ValueError("LayerTimes: all stage times are 0: nothing to simulate")

    @property
    def num_layers(self) -> int:
        return len(self.attn_s)


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """Steady-state TPOT and the event list of the last simulated step (for the timeline)."""

    tpot_s: float
    first_step_s: float  # makespan of a step started on an empty pipeline
    micro_batches: int
    busy: dict[str, float]  # fraction of the steady-state step each resource is busy
    events: tuple[tuple[str, int, int, float, float], ...]  # (resource, mb, layer, start, end)


def simulate(times: LayerTimes, micro_batches: int, steps: int = 3) -> PipelineResult:
    """Plays the A -> A->F -> F -> F->A schedule for ``steps`` decode steps.

    Each resource serves (step, layer, micro-batch) in lexicographic order, the order a real
    system issues work; a stage starts when both its resource is free and its input is ready.
    """
    if micro_batches < 1 or steps < 2:
        raise ValueError(f"need micro_batches >= 1 and steps >= 2, got {micro_batches}, {steps}")
    stage_times = (times.attn_s, times.a2f_s, times.ffn_s, times.f2a_s)
    # Per-step attention-side work (LM head and sampling of the previous token, embedding of
    # the new one) is charged to each micro-batch's layer-0 attention: it needs the previous
    # step's result but never blocks another micro-batch, so step t+1 overlaps step t.
    head = times.step_overhead_s / micro_batches
    free = [0.0] * 4
    ready = [0.0] * micro_batches  # when each micro-batch's next attention input is available
    step_end, events = [], []
    for step in range(steps):
        last_step = step == steps - 1
        for layer in range(times.num_layers):
            for mb in range(micro_batches):
                t = ready[mb]
                for r, durations in enumerate(stage_times):
                    start = max(free[r], t)
                    t = free[r] = start + durations[layer] + (head if r == 0 and layer == 0 else 0)
                    if last_step:
                        events.append((_RESOURCES[r], mb, layer, start, t))
                ready[mb] = t
        step_end.append(max(ready))
    tpot = step_end[-1] - step_end[-2]
    busy = {
        name: micro_batches * sum(d) / tpot for name, d in zip(_RESOURCES, stage_times, strict=True)
    }
    return PipelineResult(tpot, step_end[0], micro_batches, busy, tuple(events))


# ------------------------------------------------------------------ layouts and analytic times
@dataclasses.dataclass(frozen=True)
class AFDLayout:
    """xAyF: ``attn_instances`` attention and ``ffn_instances`` FFN instances of N GPUs each."""

    attn_instances: int
    ffn_instances: int
    gpus_per_instance: int = 8

    def __post_init__(self):
        if min(self.attn_instances, self.ffn_instances, self.gpus_per_instance) < 1:
            raise ValueError(f"AFDLayout counts must be >= 1, got {self}")

    @classmethod
    def parse(cls, text: str, gpus_per_instance: int = 8) -> AFDLayout:
        """ "2A2F" -> AFDLayout(2, 2, 8)."""
        m = re.fullmatch(r"\s*(\d+)\s*A\s*(\d+)\s*F\s*", text, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"layout must look like '2A2F' (xAyF), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)), gpus_per_instance)

    @property
    def attn_gpus(self) -> int:
        return self.attn_instances * self.gpus_per_instance

    @property
    def ffn_gpus(self) -> int:
        return self.ffn_instances * self.gpus_per_instance

    @property
    def total_gpus(self) -> int:
        return self.attn_gpus + self.ffn_gpus


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of peak the kernels reach; one set for a whole system (calibrate once).

    Attributes:
      compute: fraction of the FLOP/s peak.
      memory: fraction of HBM bandwidth.
      network: fraction of the NIC bandwidth.
    """

    compute: float = 1.0
    memory: float = 1.0
    network: float = 1.0

    def __post_init__(self):
        for f in ("compute", "memory", "network"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"Efficiency.{f} must be in (0, 1], got {getattr(self, f)}")

    @classmethod
    def uniform(cls, eff: float) -> Efficiency:
        return cls(eff, eff, eff)


def _roof(flops: float, nbytes: float, peak: float, bw: float, eff: Efficiency) -> float:
    return max(flops / (peak * eff.compute), nbytes / (bw * eff.memory))


def attention_layer_s(
    spec: ModelSpec, hw: HardwareSpec, seqs: float, ctx: int, eff: Efficiency
) -> float:
    """One attention layer for ``seqs`` sequences on one GPU: linears + attention core.

    The core runs at the BF16 peak when its KV is 16-bit ("BF16 attention"), else the 8-bit
    peak. Linear weights are read once per micro-batch (they do not fit in L2).
    """
    g = spec.attention[0]
    lin_p = g.linear_params
    linear = _roof(2 * lin_p * seqs, lin_p * spec.weight_bytes, hw.peak_flops, hw.mem_bw, eff)
    core_peak = hw.bf16_flops if g.kv_bytes >= 2 else hw.peak_flops
    kv = seqs * ctx * g.kv_values_per_token * g.kv_bytes
    flops = seqs * 4 * g.num_heads * g.qk_dim * ctx
    return linear + _roof(flops, kv, core_peak, hw.mem_bw, eff)


def ffn_layer_s(
    spec: ModelSpec, hw: HardwareSpec, tokens: float, gpus: int, moe: bool, eff: Efficiency
) -> float:
    """One FFN layer for ``tokens`` tokens spread evenly over ``gpus`` FFN GPUs (TP/EP).

    Weight bytes are those of the experts the batch touches: with top-k of E experts and
    ``tokens`` tokens, E * (1 - (1 - k/E)**tokens) of them on average (uniform routing).
    """
    ffn, D = spec.ffn, spec.hidden_size
    act_dense, act_moe = analytic.ffn_params_activated(ffn, D)
    if not moe:
        flops, nbytes = 2 * tokens * act_dense, act_dense * spec.weight_bytes
    else:
        touched = ffn.num_experts * (1 - (1 - ffn.top_k / ffn.num_experts) ** tokens)
        params = 3 * D * (touched * ffn.moe_intermediate + ffn.shared_intermediate)
        flops, nbytes = 2 * tokens * act_moe, params * spec.weight_bytes
    return _roof(flops / gpus, nbytes / gpus, hw.peak_flops, hw.mem_bw, eff)


def transfer_s(
    spec: ModelSpec, seqs: float, layout: AFDLayout, net: HardwareSpec, eff: Efficiency
) -> tuple[float, float]:
    """(A->F, F->A) seconds per layer per micro-batch at the busier end of the links.

    A->F carries FP8 hidden states + one fp32 scale per 128 values + top-k ids and weights;
    F->A carries BF16 partial sums. Each token goes to every FFN instance (experts split across
    them, partial results summed on the attention side), so bytes scale with ffn_instances.
    """
    D, k = spec.hidden_size, spec.ffn.top_k
    out_tok = D * 1 + (D // 128) * 4 + k * 8
    back_tok = D * 2
    fan = layout.ffn_instances
    # per attention GPU: seqs tokens x fan destinations; per FFN GPU: the same total / ffn_gpus.
    per_gpu_tokens = max(seqs * fan, seqs * fan * layout.attn_gpus / layout.ffn_gpus)
    bw = net.net_bw * eff.network
    lat = net.net_latency_s
    return lat + per_gpu_tokens * out_tok / bw, lat + per_gpu_tokens * back_tok / bw


@dataclasses.dataclass(frozen=True)
class AFDSetup:
    """Everything the analytic simulator needs besides the batch size."""

    spec: ModelSpec
    layout: AFDLayout
    ctx: int
    micro_batches: int = 3
    attn_hw: HardwareSpec | None = None  # required
    ffn_hw: HardwareSpec | None = None  # defaults to attn_hw
    efficiency: Efficiency = Efficiency()
    # Optional separate efficiency for the attention stage (e.g. measured on one attention
    # layer, as the paper's Table 9 allows); None: `efficiency` everywhere.
    attn_efficiency: Efficiency | None = None
    step_overhead_s: float = 0.0
    mem_reserve_bytes: float = 8e9  # attention GPU: embed/head, activations, workspace

    def __post_init__(self):
        if self.attn_hw is None:
            raise ValueError("AFDSetup.attn_hw is required")
        if self.ctx <= 0 or self.micro_batches < 1:
            raise ValueError(
                f"need ctx > 0 and micro_batches >= 1, got {self.ctx}, {self.micro_batches}"
            )

    @property
    def ffn_hardware(self) -> HardwareSpec:
        return self.ffn_hw or self.attn_hw


def analytic_layer_times(setup: AFDSetup, batch: int) -> LayerTimes:
    """Roofline stage times for ``batch`` sequences in flight over the whole system."""
    if batch < setup.micro_batches * setup.layout.attn_gpus:
        raise ValueError(
            f"batch={batch} must give every attention GPU at least one sequence per micro-batch "
            f"({setup.micro_batches} x {setup.layout.attn_gpus})"
        )
    lay, spec, eff = setup.layout, setup.spec, setup.efficiency
    seqs = batch / (lay.attn_gpus * setup.micro_batches)  # per attention GPU per micro-batch
    tokens = batch / setup.micro_batches  # all of one micro-batch, seen by the FFN side
    attn = attention_layer_s(spec, setup.attn_hw, seqs, setup.ctx, setup.attn_efficiency or eff)
    a2f, f2a = transfer_s(spec, seqs, lay, setup.attn_hw, eff)
    ffn_hw = setup.ffn_hardware
    moe_ids = _moe_layer_flags(spec)
    ffn = [ffn_layer_s(spec, ffn_hw, tokens, lay.ffn_gpus, m, eff) for m in moe_ids]
    L = spec.num_layers
    return LayerTimes((attn,) * L, (a2f,) * L, tuple(ffn), (f2a,) * L, setup.step_overhead_s)


def _moe_layer_flags(spec: ModelSpec) -> list[bool]:
    """Dense layers first, then MoE (their order does not change a steady-state TPOT)."""
    return [False] * spec.ffn.dense_layers + [True] * spec.ffn.moe_layers


def max_batch_by_memory(setup: AFDSetup) -> int:
    """Sequences the attention GPUs can hold: (HBM - weights - reserve) / KV per sequence."""
    spec, hw = setup.spec, setup.attn_hw
    weights = sum(g.linear_params * g.num_layers for g in spec.attention) * spec.weight_bytes
    per_seq = sum(
        g.num_layers * g.kv_values_per_token * g.kv_bytes * min(setup.ctx, g.window or setup.ctx)
        for g in spec.attention
    )
    room = hw.mem_bytes - weights - setup.mem_reserve_bytes
    if room <= 0:
        return 0
    return int(room // per_seq) * setup.layout.attn_gpus


def ffn_weight_bytes_per_gpu(setup: AFDSetup) -> float:
    """All FFN weights (every expert, dense and MoE layers) split over the FFN GPUs."""
    spec = setup.spec
    dense, moe = analytic.ffn_params_total(spec.ffn, spec.hidden_size)
    total = spec.ffn.dense_layers * dense + spec.ffn.moe_layers * moe
    return total * spec.weight_bytes / setup.layout.ffn_gpus


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The operating point: the largest batch meeting the TPOT SLA and the memory limit."""

    batch: int
    tpot_s: float
    tokens_per_s_per_gpu: float
    bound: str  # "sla" or "memory"
    pipeline: PipelineResult


def tokens_per_s_per_gpu(batch: int, tpot_s: float, layout: AFDLayout) -> float:
    """batch / TPOT / (#attention GPUs + #FFN GPUs)."""
    return batch / tpot_s / layout.total_gpus


def predict(setup: AFDSetup, tpot_sla_s: float = 0.050) -> Prediction:
    """Largest batch (a multiple of micro_batches x attention GPUs) with TPOT <= SLA."""
    unit = setup.micro_batches * setup.layout.attn_gpus
    mem_cap = max_batch_by_memory(setup) // unit
    ffn_bytes = ffn_weight_bytes_per_gpu(setup)
    if ffn_bytes > setup.ffn_hardware.mem_bytes:
        raise ValueError(
            f"FFN weights need {ffn_bytes / 1e9:.0f} GB per FFN GPU, more than the "
            f"{setup.ffn_hardware.mem_bytes / 1e9:.0f} GB of {setup.ffn_hardware.name}: "
            "use more FFN instances"
        )

    def tpot(units: int) -> PipelineResult:
        return simulate(analytic_layer_times(setup, units * unit), setup.micro_batches)

    if mem_cap < 1 or tpot(1).tpot_s > tpot_sla_s:
        raise ValueError(
            f"no batch meets TPOT {tpot_sla_s * 1e3:.1f} ms within memory (cap {mem_cap} units)"
        )
    lo, hi = 1, mem_cap  # TPOT grows with the batch: bisect on the largest feasible multiple
    if tpot(hi).tpot_s <= tpot_sla_s:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tpot(mid).tpot_s <= tpot_sla_s else (lo, mid)
    res = tpot(lo)
    bound = "memory" if lo == mem_cap else "sla"
    return Prediction(
        lo * unit, res.tpot_s, tokens_per_s_per_gpu(lo * unit, res.tpot_s, setup.layout), bound, res
    )


# ------------------------------------------------------------------ measured times
@dataclasses.dataclass(frozen=True)
class MeasuredRun:
    """One run from a benchmark JSON (see the module docstring for the schema)."""

    name: str
    layout: AFDLayout
    micro_batches: int
    batch: int | None
    times: LayerTimes | None  # None: the run has no stage times (null: not measured)
    measured_step_s: float | None


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)  # JSON true is not 1 us


def _per_layer(value, num_layers: int | None, key: str) -> tuple[float, ...]:
    if _is_number(value):
        if num_layers is None:
            raise ValueError(f"{key} is a scalar: the run needs 'num_layers'")
        _check_times(key, (value,), "microseconds")
        return (float(value) * 1e-6,) * num_layers
    if isinstance(value, list) and 0 < len(value) <= MAX_LAYERS and all(map(_is_number, value)):
        _check_times(key, [float(v) for v in value], "microseconds")
        return tuple(float(v) * 1e-6 for v in value)
    raise ValueError(
        f"{key} must be a number or a list of 1 to {MAX_LAYERS} (one per layer) microseconds, "
        f"got {value!r:.80}"
    )


def _count(run: dict, key: str, default, maximum: int) -> int | None:
    """An integer field in ``[1, maximum]`` (or its default when absent)."""
    value = run.get(key, default)
    if value is not None and (not is_int(value) or not 1 <= value <= maximum):
        raise ValueError(f"{key} must be an integer in [1, {maximum}], got {value!r}")
    return value


def parse_run(run: dict, index: int = 0) -> MeasuredRun:
    """One run dict -> MeasuredRun; raises ValueError naming the run and the bad key."""
    try:
        return _parse_run(run, index)
    except ValueError as e:
        raise ValueError(f"run {index}: {e}") from e


def _parse_run(run: dict, index: int) -> MeasuredRun:
    for key in ("attn_us_per_layer", "ffn_us_per_layer"):
        if key not in run:
            raise ValueError(f"missing {key!r} (microseconds per layer)")
    n = _count(run, "num_layers", None, MAX_LAYERS)
    micro_batches = _count(run, "micro_batches", 1, MAX_MICRO_BATCHES)
    layout = AFDLayout.parse(run.get("layout", "1A1F"), int(run.get("gpus_per_instance", 1)))
    step_ms = run.get("measured_step_ms", run.get("tpot_ms"))
    if step_ms is not None:
        _check_times("measured_step_ms", (float(step_ms),), "milliseconds")
    measured = dict(
        name=str(run.get("name", f"run{index}")),
        layout=layout,
        micro_batches=micro_batches,
        batch=run.get("batch"),
        measured_step_s=None if step_ms is None else float(step_ms) * 1e-3,
    )
    if run["attn_us_per_layer"] is None and run["ffn_us_per_layer"] is None:
        return MeasuredRun(times=None, **measured)  # a run whose stages were not timed
    attn = _per_layer(run["attn_us_per_layer"], n, "attn_us_per_layer")
    n = n or len(attn)
    ffn = _per_layer(run["ffn_us_per_layer"], n, "ffn_us_per_layer")
    both = run.get("transfer_us_per_layer", 0.0)
    a2f = _per_layer(run.get("a2f_us_per_layer", both), n, "a2f_us_per_layer")
    f2a = _per_layer(run.get("f2a_us_per_layer", both), n, "f2a_us_per_layer")
    overhead = float(run.get("step_overhead_us", 0.0)) * 1e-6
    return MeasuredRun(times=LayerTimes(attn, a2f, ffn, f2a, overhead), **measured)


def load_measured(path: str | Path) -> list[MeasuredRun]:
    """Reads a benchmark JSON: ``{"runs": [...]}``, a bare list of runs, or one run."""
    data = json.loads(Path(path).read_text())
    runs = data.get("runs", [data]) if isinstance(data, dict) else data
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path}: expected a run dict, a list of runs or {{'runs': [...]}}")
    return [parse_run(r, i) for i, r in enumerate(runs)]


def compare_measured(run: MeasuredRun) -> dict:
    """Simulated vs measured TPOT for one run (relative error when a measurement exists);
    a run without stage times is reported as not simulated."""
    if run.times is None:
        return dict(
            name=run.name,
            simulated_step_ms=None,
            measured_step_ms=None if run.measured_step_s is None else run.measured_step_s * 1e3,
            rel_error=None,
            note="not simulated: the run has no stage times (null: not measured)",
        )
    sim = simulate(run.times, run.micro_batches)
    out = dict(
        name=run.name,
        simulated_step_ms=sim.tpot_s * 1e3,
        measured_step_ms=None,
        rel_error=None,
        busy=sim.busy,
    )
    if run.measured_step_s:
        out["measured_step_ms"] = run.measured_step_s * 1e3
        out["rel_error"] = sim.tpot_s / run.measured_step_s - 1.0
    if run.batch:
        out["simulated_tokens_per_s_per_gpu"] = tokens_per_s_per_gpu(
            run.batch, sim.tpot_s, run.layout
        )
    return out


# ------------------------------------------------------------------ the paper's runs
@dataclasses.dataclass(frozen=True)
class PaperRun:
    """A measured decode run from the paper's Table 8 (Hopper H800, 50 ms TPOT SLA)."""

    name: str
    layout: str
    ctx: int
    kv_bytes: float  # 1: FP8 attention, 2: BF16 attention
    tokens_per_s_per_gpu: float


PAPER_AFD_RUNS = (
    PaperRun("2A2F 4K FP8 attention", "2A2F", 4096, 1.0, 4039.0),
    PaperRun("3A2F 4K BF16 attention", "3A2F", 4096, 2.0, 3321.0),
    PaperRun("4A2F 8K FP8 attention", "4A2F", 8192, 1.0, 2643.0),
)


def paper_setup(run: PaperRun, hw: HardwareSpec, efficiency: Efficiency, **kw) -> AFDSetup:
    """The AFDSetup of one paper run: Step-3, 8-GPU instances, 3 micro-batches."""
    spec = from_step3_config(Step3Config.step3(), kv_bytes=run.kv_bytes)
    return AFDSetup(spec, AFDLayout.parse(run.layout), run.ctx, 3, hw, efficiency=efficiency, **kw)


def calibrate_uniform_efficiency(
    run: PaperRun, hw: HardwareSpec, tpot_sla_s: float = 0.050, iters: int = 30
) -> float:
    """The single efficiency (compute = memory = network) at which ``run`` is reproduced.

    Throughput rises monotonically with efficiency, so bisection on (0.05, 1] converges.
    """
    lo, hi = 0.05, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        p = predict(paper_setup(run, hw, Efficiency.uniform(mid)), tpot_sla_s)
        lo, hi = (lo, mid) if p.tokens_per_s_per_gpu >= run.tokens_per_s_per_gpu else (mid, hi)
    return 0.5 * (lo + hi)


def paper_comparison(hw: HardwareSpec, efficiency: Efficiency) -> list[dict]:
    """Predicted vs printed tokens/s/GPU for the three paper runs, one efficiency for all."""
    rows = []
    for run in PAPER_AFD_RUNS:
        p = predict(paper_setup(run, hw, efficiency))
        rows.append(
            dict(
                run=run.name,
                paper=run.tokens_per_s_per_gpu,
                predicted=p.tokens_per_s_per_gpu,
                batch=p.batch,
                tpot_ms=p.tpot_s * 1e3,
                bound=p.bound,
                rel_error=p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1,
            )
        )
    return rows
