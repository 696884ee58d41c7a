#!/usr/bin/env bash
# Every GPU measurement the open issues still wait for, as device calls of <= ~9.5 min
# each (a session has ~30 min of device time, start-up included). Run them in this order; each
# call is self-contained (installs the tree, writes JSON + logs under OUT_DIR/callN).
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 1 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 2 $OUT  # H200 only
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 3 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 4 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 5 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 6 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 7 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 8 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 9 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 10 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 11 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 12 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 13 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 14 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 15 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 16 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 17 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 18 $OUT  # H200 only
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 19 $OUT  # H200 only
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 20 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 21 $OUT  # H200 only
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 22 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 23 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 24 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 25 $OUT  # H200 first
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 26 $OUT  # H200 first
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 27 $OUT  # H200 only
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 28 $OUT  # any Hopper
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_pending.sh 29 $OUT  # any Hopper
# Still to run (as of 2026-12-06, after call 29): 19 and 21 on an H200 (19 ran on an H100 at
# 76ea946); 27 (the 728 px tower and both full-size roles on an H200: no H200 could be had
# after commit 42bb1d6). Calls 1, 2, 12-18, 20, 22-26, 28 and 29 have run (docs/LOG.md; call
# 29's first command ran again at 4055321 after a fix). Call 2's FFN rows and 512-sequence
# attention rows ran out of memory (one process for several full-size runs); call 18 ran them
# one per process.
#
# call 1 (issue 16): the rest of the small-batch split-K sweep that fits config.SPLIT_COSTS
#   (B = 2, 4, 8 at 4K; B = 1..8 at 8K and 32K; the 1K rows and B = 1 at 4K ran twice), then
#   `python3 -m step3_jax.kernels.mfa_decode.splitk OUT/call1/0*/mfa_decode_*.json --sms 132`
#   with the two H100 partial files in benchmarks/results/ (132 SMs on H100 SXM and H200). An
#   H200 fit also needs the 1K and B = 1 at 4K rows: add them in a call of their own.
# call 2 (issues 13 and 16 item 4): one device's side of the full Step-3 1A3F AFD step (the FFN
#   role holds ~100 GB: needs_h200; its FFN row is also item 4's FFN-device shape: 16 of 48
#   experts at 256 and 512 tokens), then the attention role on the transposed-V FP8 cache.
# call 3 (issues 17 and 18): the serving curve (engine vs bare step) and the vision tower.
# call 4 (issues 13 and 18, any Hopper): why the attention role runs at 23% of copy: the
#   compiled 8-layer role program's temp bytes and arena-sized ops, the lax.cond / FP8-scatter
#   micro-probes, the 16-layer attention role with the CUPTI kernel list and the profiler's
#   device lines (`--trace`); then the vision tower at 728 x 728 (JAX bf16 + torch twin + FP8;
#   FP8 through XLA).
# call 5 (issues 13 and 17, any Hopper): the FFN role on 24 layers (1 dense + 23 MoE: ~40 GB,
#   fits an H100; per-layer times are what the simulator reads), then the serving curve.
# call 6 (issue 13, any Hopper): the role programs after the tick rework (one-role programs drop
#   their idle ticks and run with no conditional but the q/k/v one; the FFN kind is static):
#   attention role 16 layers (+ profiler trace), FFN role 24 layers (+ trace), then the
#   compiled attention program's temp bytes with the q/k/v reads ordered by the conditional
#   (product) or an optimization barrier, and with XLA's dynamic-slice fusion (weight views
#   read in place by the custom calls?), and the attention role timed with each alternative.
# call 7 (issues 13 and 18, any Hopper): the attention role with the q/k/v barrier (16 layers
#   + trace; with cuBLAS instead of Triton GEMMs for the lm_head, alone and with XLA's
#   dynamic-slice fusion: does the lm_head view stop being copied?), the attention role at the
#   full 61 layers (~47 GB), the FFN role program's HLO (where its glue comes from), and the
#   vision tower's profile (bf16, 728 px).
# call 8 (issues 13, 17, 18, any Hopper): the attention role with the lm_head fix (rows padded
#   to a multiple of 8, cuBLAS + dynamic-slice fusion: 16 layers + trace, and 61 layers), the
#   engine's overhead over the bare step where decoding dominates (64 closed-loop clients,
#   short prompts; per-level decode/prefill iteration times), the vision tower with cuBLAS
#   instead of Triton GEMM fusions.
# call 9 (issues 17 and 13, any Hopper): the engine's decode iteration against the corrected
#   bare step (distinct rows: every expert read), in the caller's thread, its own thread and
#   with 64 client threads; then the 61-layer attention role with a profiler trace.
# call 10 (issues 13 and 16, any Hopper): the 61-layer attention role's device time by jax name
#   scope (which of the four Mosaic kernels is which), the dense FP8 GEMMs of the attention
#   half at M = 256 and 512 with every tile config, and the MFA ragged work list on the GPU
#   (its GPU tests, then tuned vs ragged on full and ragged batches at 4K and 32K).
# call 11 (issues 13 and 18, any Hopper): the 61-layer attention role with the M = 256 dense
#   GEMM picks (+ trace by scope), the dense GEMMs at M = 512 that call 10 did not reach, the
#   vision padding tests on the GPU (cuDNN's padding mask), then the 728 px tower padded to
#   2,712 tokens with cuBLAS GEMMs (the default) against unpadded in the same run.
# call 12 (issue 13, any Hopper): the 61-layer attention role after `quant._amax` became one
#   reduction (predicted -6 us a layer), then the same with XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
#   (do the `.remat` fusions of the 75% default go? predicted -15 us a layer), then the FFN
#   role on 24 layers with command buffers off and a trace (its glue by HLO op; the packet is
#   now read as it is, predicted 807 -> ~790 us a layer host loop), and the FFN role
#   program's optimized HLO (`afd_hlo_probe.py --role ffn`, which writes it to $OUT).
# call 13 (issue 13, any Hopper): after the loop-free tile table and the fused gate/up SwiGLU of
#   the shared expert and dense FFN: their GPU tests, the 61-layer attention role (against call
#   12's 26.28 ms), the 24-layer FFN role with command buffers off and a trace (against call
#   12's 18.20 ms and ~113 us a layer of glue), the FFN role at 256 and 512 tokens a tick, and
#   the attention role at B = 512 on 24 layers (61 do not fit an H100).
# call 14 (issues 16 and 13, any Hopper): the unsplit MFA grid's CTAs longest sequence first
#   (`config.use_longest_first`): its GPU tests, the kernel at B = 256 and 512 at 4K (full and
#   lengths U[2K, 4K]) against the index-order grid and the ragged work list, then the
#   attention role (61 layers at 256; 24 layers at 512) against call 13.
# call 15 (issue 13, any Hopper): the MoE dispatch with one packed-key sort and
#   compare-and-sum counts (GPU tests), then where each role's time goes now: the FFN role at
#   256 and 512 tokens a tick and the 61-layer attention role, command buffers off, traced by
#   HLO op and scope; the attention role program's optimized HLO (its quantization kernels).
# call 16 (issues 13 and 16, any Hopper): the FP8 linear GPU tests and the grouped kernel with
#   128-row warpgroup tiles (correctness), the MFA kernel's FP8 o epilogue and o_proj reading
#   it (correctness), and the 61-layer attention role with o quantized by the GEMM (then the
#   default) and by the MFA epilogue (`--o-quant attention`, predicted -11 us a layer). The
#   attention role is NOT comparable with call 14's 25.57 ms: it now keeps the router and the
#   packet, which XLA deleted before (predicted +5 to +10 us a layer), against -2.3 us (tile
#   tables), -3 to -5 us (the KV write as 2 scatters, not 4) and ~-3 us (the page offsets as
#   one expression). Sized to fit a call started with ~8 minutes of device time left.
# call 17 (issues 13 and 16, any Hopper): the dense FP8 GEMMs of the attention half and of the
#   FFN device's shared-expert slice (fused gate/up SwiGLU, down) at M = 256 and 512 with
#   128-row warpgroup tiles (256 x 128 and 128 x 256 CTAs) against the current picks
#   (predicted: o_proj at M = 256 65 -> ~55 us if the SMEM fill, not the wgmma, is the limit;
#   the shared gate/up, 64 x 64 tiles now, reads its x tile 28 times), the 728 px vision
#   tower (issue 18) with q/k/v as three GEMMs over the fused weight's row blocks (against
#   call 11's 55.7 ms; predicted -1.5 ms: the three strided q/k/v copies, 29 us a layer, go;
#   the GEMMs may lose a little),
#   the FFN role at 256 and 512 tokens (against call 13's 730 / 804 us a layer; predicted -2
#   us a layer from the dense GEMMs' tile tables as host constants), and the 512-token FFN
#   role traced on 8 layers (24 traced layers overflowed the profiler's activity buffer in
#   call 15).
# call 18 (issues 13, 16 and 18, H200 only): the two GPU tests call 16 failed, mended (the
#   FP8 o bound then widened by 2^-10, since replaced by a derived one; the FP8 P.V class's
#   split test on the "seq" split); then the full-size rows call 2 could not fit, each
#   in a process of its own with 95% of the GPU's memory for XLA and the allocator's use
#   recorded before and after the arena fill (call 2 ran them after an earlier run in the
#   same process: is memory left held, or does the step need a second arena?): the FFN role
#   (56 layers, 16 of 48 experts) at 256 tokens a tick, the attention role at 512 sequences,
#   then the FFN role at 512; the 728 px vision tower timed by the harness (device time,
#   against call 17's 55.9 ms host time and 46.9 ms of busy trace).
# call 19 (issue 16, H200 only, ~2 min): the FP8 MFA decode kernel as tuned now (ring epilogue,
#   V converted by the memory warpgroup, CTAs longest first, the ragged work list where the
#   tables choose it) at B = 64, 128, 256 and 4K / 32K, full and ragged (U[S/2, S]) batches,
#   against the bf16 kernel and XLA FP8 in the same run: the issue's 90%-of-copy target on
#   the H200 (last measured there at 78%, B = 128 x 4K, before these changes). First the FP8 o
#   test under its derived bound (f32 dequantization), which has not run on a GPU.
# call 20 (issues 13 and 16 item 4, any Hopper, ~5 min): the FFN role on 24 layers with the
#   shared expert as its own SwiGLU and as one more group of the routed launches
#   (`--shared-expert own|routed`), 256 and 512 tokens a tick, one process each; then an
#   8-layer trace at 512 tokens with it routed (where the shared slice's time went).
# call 21 (issue 13, H200 only: ~96 GiB): the full-size FFN role as it defaults now (the
#   compare-and-count dispatch; the shared expert as its own SwiGLU) against call 18's
#   32.11 / 35.84 ms, 256 and 512 tokens, one process each (feeds `step3-jax cost simulate
#   --measured`). (The
#   whole-layer `bench_moe.py` row it also held ran on an H100 instead, commit 4a2dfd9.)
# call 22 (issue 13, any Hopper, ~4 min): the grouped-GEMM GPU tests, then the FFN role on 24
#   layers (shared expert routed) with the MoE pairs ordered by the sort kernel
#   (`--moe-dispatch sort`) and by the compare-and-count rank (the default up to 2,048 pairs),
#   256 and 512 tokens. Predicted: -10 us a MoE layer (sort 12.6 + scatter 1.2 us -> ~4 us).
# call 23 (issues 18, 13, 16; any Hopper, ~7 min): the vision tower's MLP at 728 px
#   (`bench_vision_mlp.py`: does fc1's cuBLAS GEMM write float32 for quick_gelu's convert
#   pass to read? can the grouped kernel's bf16 path keep up with cuBLAS at M = 2,712, so that
#   quick_gelu could ride its epilogue?), the grouped-GEMM GPU tests after cf9b68f (no branch
#   around the routed items without a dense group), and the 61-layer attention role with
#   command buffers off, traced by scope (where its glue is now).
# call 24 (issue 18, any Hopper, ~6 min): the vision MLP's fc1 + bias + quick_gelu as one
#   Pallas launch (the grouped kernel's new epilogue; `KernelPolicy.vision_mlp`), and every
#   float linear writing its own dtype (bf16, not float32 then a convert): their GPU tests,
#   `bench_vision_mlp.py` (fused vs unfused at 728 px), then the 728 px tower (default vs
#   `vision_mlp="xla"` in the same run; with a trace) against 48.3 ms on the H200 / 55.7 ms on
#   the H100. Predicted (H100): fc1 + quick_gelu 291 -> ~212 us a layer, the tower -4 to -5 ms.
#   Then the router's logits GEMM (`bench_router.py`: one skinny GEMM against split-K forms;
#   12.1 us a layer in the attention role's trace for 4.4 MB of operands), and the tower with
#   XLA's cuDNN LayerNorm rewrite (its LayerNorms and residual adds: ~45 us a layer).
# call 25 (issue 18; the H200 first, any Hopper else, ~6 min): the 728 px tower with the fused
#   vision MLP (as call 24 on the H100: 45.57 ms, 59.1%), the attention block alone
#   (`bench_vision_attention.py`: XLA's dot merger puts the three q/k/v GEMMs back into one
#   whose cuBLAS kernel has no bias epilogue; cuDNN at head_dim 112 against 128), then the tower
#   with the dot merger off. Predicted: -10 to -20 us a layer without the merger (three bias
#   epilogues, no q/k/v add passes), 0.6-1.2 ms a view.
# call 26 (issues 18 and 13; the H200 first, ~8 min): the 728 px tower with its convolutions as
#   GEMMs over im2col windows (d4bf650), traced, with XLA's dot merger on (default) and off;
#   then, on an H200 only (~100 GB), call 21's full-size FFN role at 256 and 512 tokens.
#   Predicted: the stem -1.2 ms a view (its tf32 convolutions and the 622 us weight re-layout
#   go; the 302 M-parameter downsampler2 weight read once at copy rate, ~0.2 ms).
# call 27 (issues 18 and 13; H200 only, ~8 min): the 728 px tower on the issue's device (traced,
#   host loop time beside; again with XLA's command buffers off: where do the ~11 ms between
#   a blocked call's wall time and its device time go?), the 61-layer attention role at 256 sequences, then the full-size
#   FFN role at 256 and 512 tokens (call 21), each in its own process.
# call 28 (all issues, any Hopper, ~8 min): every GPU-marked test, then the 728 px tower with the
#   host loop time beside its device time, with command buffers on (default) and off.
# call 29 (issues 18 and 13, any Hopper, ~6 min): the tower's host cost (dispatch, the module
#   flatten, the same program over a flat list of arrays), then both roles at HEAD: the FFN role
#   on 24 layers at 256 and 512 tokens (defaults, after the optimization barrier of fa057ad)
#   and the 61-layer attention role at 256 sequences.
# Each call ends as ONE archive, OUT_DIR/callN.tgz (the device tool returns only a few files per
# call). Copy the JSON you keep into benchmarks/results/ and the numbers into docs/LOG.md.
set -u
if [ $# -lt 2 ]; then sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; fi
CALL=$1 OUT_DIR=$2
HERE=$(cd "$(dirname "$0")" && pwd)
export ARCHIVE=1  # each call ends as one OUT_DIR/callN.tgz
RUN="bash $HERE/gpu_run.sh"
# What several calls run: one device's side of the 1A3F step (`--runs`, `--role` and the rest
# per call), command buffers off (per-kernel HLO ops in a trace), the GPU tests.
AFD_ROLE="python3 benchmarks/bench_afd.py --layout 1A3F --cache float8_e4m3fn --weights float8_e4m3fn --reps 3"
NOCB="XLA_FLAGS=--xla_gpu_enable_command_buffer="
GPU_TESTS="python3 -m pytest -q -rfE -p no:cacheprovider -m gpu -n 4"
SERVING="@290 RATES=\${RATES:-2,8,16} DURATION=\${DURATION:-20} bash benchmarks/gpu_serving.sh \$OUT"
MFA="python3 benchmarks/bench_mfa_decode.py --out \$OUT --variants ''"
# The 728 px tower, bf16 only (each call adds --iters, --trace, --host-costs, --out ...).
VISION="python3 benchmarks/bench_vision.py --size 728 --no-torch --no-fp8"
case "$CALL" in
  1)
    SPLITS="--breakdown '' --impls pallas_fp8,xla_fp8 --splits 1,2,4,8,16,32,64"
    $RUN -t 60 "$OUT_DIR/call1" \
      "@150 $MFA $SPLITS --batches 2,4,8 --contexts 4096" \
      "@170 $MFA $SPLITS --batches 1,2,4,8 --contexts 8192" \
      "@190 $MFA $SPLITS --batches 1,2,4,8 --contexts 32768"
    ;;
  2)
    $RUN -t 250 "$OUT_DIR/call2" \
      '@380 python3 benchmarks/bench_afd.py --role both --layout 1A3F --full --runs 1x256,1x512 --cache float8_e4m3fn --weights float8_e4m3fn --reps 5 --out $OUT/afd_roles_1a3f.json' \
      '@150 python3 benchmarks/bench_afd.py --role attention --layout 1A3F --full --runs 1x256,1x512 --cache float8_e4m3fn --weights float8_e4m3fn --v-transposed --reps 5 --out $OUT/afd_attention_1a3f_vT.json'
    ;;
  3)
    $RUN -t 290 "$OUT_DIR/call3" "$SERVING" \
      "@270 TEST_TIMEOUT=\${TEST_TIMEOUT:-60} bash benchmarks/gpu_vision.sh \$OUT"
    ;;
  4)
    ROLE="python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3 --trace"
    $RUN -t 120 "$OUT_DIR/call4" \
      '@75 python3 benchmarks/afd_hlo_probe.py --role attention --layers 8 --cond --scatter --scatter-bytes 268435456 --out $OUT/probe.json' \
      "@65 $ROLE --role attention --layers 16 --out \$OUT/attention16.json" \
      '@110 python3 benchmarks/bench_vision.py --iters 10 --size 728 --fp8-gemm auto --out $OUT/vision_728.json' \
      '@100 python3 benchmarks/bench_vision.py --iters 10 --size 728 --fp8-gemm xla --no-torch --out $OUT/vision_728_xla_fp8.json'
    ;;
  5)
    $RUN -t 250 "$OUT_DIR/call5" \
      '@250 python3 benchmarks/bench_afd.py --role ffn --layout 1A3F --layers 24 --runs 1x256,1x512 --cache float8_e4m3fn --weights float8_e4m3fn --reps 5 --trace --out $OUT/afd_ffn24.json' \
      "$SERVING"
    ;;
  6)
    ROLE="python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3"
    PROBE="python3 benchmarks/afd_hlo_probe.py --role attention --layers 8"
    DSF="XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true"
    $RUN -t 90 "$OUT_DIR/call6" \
      "@70 $ROLE --role attention --layers 16 --trace --out \$OUT/attention16.json" \
      "@120 $ROLE --role ffn --layers 24 --trace --out \$OUT/ffn24.json" \
      "@40 $PROBE --out \$OUT/probe_cond.json" \
      "@40 $PROBE --qkv-order barrier --out \$OUT/probe_barrier.json" \
      "@40 $DSF $PROBE --out \$OUT/probe_dsf.json" \
      "@60 $ROLE --role attention --layers 16 --qkv-order barrier --out \$OUT/attention16_barrier.json" \
      "@60 $DSF $ROLE --role attention --layers 16 --out \$OUT/attention16_dsf.json"
    ;;
  7)
    ROLE="python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3"
    CUBLAS="XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
    DSF="XLA_FLAGS='--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true'"
    $RUN -t 60 "$OUT_DIR/call7" \
      "$ROLE --role attention --layers 16 --trace --out \$OUT/attention16.json" \
      "$CUBLAS $ROLE --role attention --layers 16 --out \$OUT/attention16_cublas.json" \
      "$DSF $ROLE --role attention --layers 16 --trace --out \$OUT/attention16_cublas_dsf.json" \
      "@130 $ROLE --role attention --full --trace --out \$OUT/attention61.json" \
      "@50 python3 benchmarks/afd_hlo_probe.py --role ffn --layers 24 --out \$OUT/probe_ffn.json" \
      "@110 python3 benchmarks/bench_vision.py --iters 5 --size 728 --no-torch --no-fp8 --trace --out \$OUT/vision_728_trace.json"
    ;;
  8)
    ROLE="python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3 --role attention"
    $RUN -t 60 "$OUT_DIR/call8" \
      "$ROLE --layers 16 --trace --out \$OUT/attention16.json" \
      "@70 $ROLE --full --out \$OUT/attention61.json" \
      "@130 RATES= CONCURRENCY=64 PROMPT_LEN=64:128 OUTPUT_LEN=256:512 DURATION=20 bash benchmarks/gpu_serving.sh \$OUT" \
      "@60 XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 benchmarks/bench_vision.py --iters 5 --size 728 --no-torch --no-fp8 --trace --out \$OUT/vision_728_cublas.json"
    ;;
  9)
    $RUN -t 200 "$OUT_DIR/call9" \
      "@200 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 python3 benchmarks/bench_engine_overhead.py --step3 --layers 4 --precision fp8+kv8 --max-batch 64 --max-len 4096 --page-size 64 --prefill-chunk 256 --prompt-len 64:64 --output-len 256:256 --out \$OUT" \
      "@80 python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3 --role attention --full --trace --out \$OUT/attention61.json"
    ;;
  10)
    $RUN -t 60 "$OUT_DIR/call10" \
      "@60 python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3 --role attention --full --trace --out \$OUT/attention61.json" \
      "@110 python3 -m pytest -q -rfE -p no:cacheprovider -m gpu -n 4 tests/pallas_kernels/test_mfa_decode.py -k 'Ragged or forced_splits'" \
      "@120 $MFA --breakdown 128x4096 --batches 128,256 --contexts 4096,32768 --impls pallas_fp8,pallas_fp8_ragged --ragged both" \
      "@90 python3 benchmarks/bench_dense_fp8.py --m 256,512 --out \$OUT/dense_fp8.json"
    ;;
  11)
    $RUN -t 60 "$OUT_DIR/call11" \
      "@60 python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3 --role attention --full --trace --out \$OUT/attention61.json" \
      "@70 python3 benchmarks/bench_dense_fp8.py --m 512 --shapes k_proj,wq,o_proj --out \$OUT/dense_fp8_m512.json" \
      "@70 python3 -m pytest -q -rfE -p no:cacheprovider -p no:xdist tests/vision/test_vision_padding.py" \
      "@90 $VISION --iters 5 --trace --out \$OUT/vision_728_pad8.json" \
      "@80 $VISION --iters 5 --token-multiple 1 --out \$OUT/vision_728_nopad_cublas.json"
    ;;
  12)
    ROLE="python3 benchmarks/bench_afd.py --layout 1A3F --runs 1x256 --cache float8_e4m3fn --weights float8_e4m3fn --reps 3"
    $RUN -t 60 "$OUT_DIR/call12" \
      "@60 $ROLE --role attention --full --out \$OUT/attention61.json" \
      "@60 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 $ROLE --role attention --full --trace --out \$OUT/attention61_mem94.json" \
      "@130 XLA_FLAGS=--xla_gpu_enable_command_buffer= $ROLE --role ffn --layers 24 --trace --out \$OUT/ffn24_nocmdbuf.json" \
      "@60 python3 benchmarks/afd_hlo_probe.py --role ffn --layers 2 --out \$OUT/probe_ffn.json"
    ;;
  13)
    ROLE=$AFD_ROLE
    $RUN -t 60 "$OUT_DIR/call13" \
      "@150 $GPU_TESTS tests/pallas_kernels/test_grouped_gemm.py tests/quant/test_fp8_pallas_linear.py" \
      "@60 $ROLE --runs 1x256 --role attention --full --out \$OUT/attention61.json" \
      "@70 $NOCB $ROLE --runs 1x256 --role ffn --layers 24 --trace --out \$OUT/ffn24_nocmdbuf.json" \
      "@90 $ROLE --runs 1x256,1x512 --role ffn --layers 24 --out \$OUT/ffn24.json" \
      "@90 $ROLE --runs 1x512 --role attention --layers 24 --out \$OUT/attention24_b512.json"
    ;;
  14)
    ROLE=$AFD_ROLE
    T=tests/pallas_kernels/test_mfa_decode.py  # expanded here: the runner's shell has no T
    $RUN -t 60 "$OUT_DIR/call14" \
      "@150 $GPU_TESTS $T::TestPallasGPU $T::test_longest_first_order_gpu" \
      "@150 $MFA --breakdown '' --batches 256,512 --contexts 4096 --impls pallas_fp8,pallas_fp8_index_order,pallas_fp8_ragged --ragged both" \
      "@60 $ROLE --runs 1x256 --role attention --full --out \$OUT/attention61.json" \
      "@80 $ROLE --runs 1x512 --role attention --layers 24 --out \$OUT/attention24_b512.json"
    ;;
  15)
    ROLE="$AFD_ROLE --trace"
    $RUN -t 40 "$OUT_DIR/call15" \
      "@90 $GPU_TESTS tests/pallas_kernels/test_grouped_gemm.py" \
      "@70 $NOCB $ROLE --runs 1x256,1x512 --role ffn --layers 24 --out \$OUT/ffn24_nocmdbuf.json" \
      "@45 $NOCB $ROLE --runs 1x256 --role attention --full --out \$OUT/attention61_nocmdbuf.json" \
      "@40 python3 benchmarks/afd_hlo_probe.py --role attention --layers 2 --out \$OUT/probe_attention.json"
    ;;
  16)
    ROLE=$AFD_ROLE
    G=tests/pallas_kernels/test_grouped_gemm.py  # expanded here: the runner's shell has no G
    M=tests/pallas_kernels/test_mfa_decode.py
    $RUN -t 40 "$OUT_DIR/call16" \
      "@120 $GPU_TESTS tests/quant/test_fp8_pallas_linear.py $G::test_wide_row_tiles_fp8 $M::test_fp8_out_gpu" \
      "@60 $ROLE --runs 1x256 --role attention --full --o-quant gemm --out \$OUT/attention61.json" \
      "@60 $ROLE --runs 1x256 --role attention --full --o-quant attention --out \$OUT/attention61_oquant.json"
    ;;
  17)
    ROLE="$AFD_ROLE --trace"
    WIDE=1wg_64x64,2wg_m_128x128,2wg_n_64x256,1wg_128x128,2wg_m_256x128,2wg_n_128x256
    $RUN -t 40 "$OUT_DIR/call17" \
      "@200 python3 benchmarks/bench_dense_fp8.py --m 256,512 --shapes o_proj,wq,qkv_proj,shared_gate_up,shared_down --configs $WIDE --out \$OUT/dense_wide.json" \
      "@70 $AFD_ROLE --runs 1x256,1x512 --role ffn --layers 24 --out \$OUT/ffn24.json" \
      "@50 $NOCB $AFD_ROLE --runs 1x512 --role ffn --layers 8 --trace --out \$OUT/ffn8_b512_nocmdbuf.json" \
      "@90 $VISION --iters 5 --trace --out \$OUT/vision_728_split_qkv.json"
    ;;
  18)
    M=tests/pallas_kernels/test_mfa_decode.py
    FULL="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 $AFD_ROLE --full"
    $RUN -t 60 "$OUT_DIR/call18" \
      "@90 $GPU_TESTS $M::test_fp8_out_gpu $M::TestPallasGPUFp8PV::test_sm_scale_and_split_config" \
      "@150 $FULL --runs 1x256 --role ffn --out \$OUT/ffn_full_256.json" \
      "@100 $FULL --runs 1x512 --role attention --out \$OUT/attention_full_512.json" \
      "@70 python3 benchmarks/bench_vision.py --iters 5 --size 728 --no-torch --no-fp8 --out \$OUT/vision_728.json" \
      "@150 $FULL --runs 1x512 --role ffn --out \$OUT/ffn_full_512.json"
    ;;
  19)
    M=tests/pallas_kernels/test_mfa_decode.py
    $RUN -t 60 "$OUT_DIR/call19" \
      "@60 $GPU_TESTS $M::test_fp8_out_gpu" \
      "@170 $MFA --breakdown '' --batches 64,128,256 --contexts 4096,32768 --impls pallas_fp8,pallas_bf16,xla_fp8 --ragged both"
    ;;
  20)
    ROLE="$AFD_ROLE --runs 1x256,1x512 --role ffn --layers 24"
    $RUN -t 40 "$OUT_DIR/call20" \
      "@100 $ROLE --shared-expert own --out \$OUT/ffn24_shared_own.json" \
      "@100 $ROLE --shared-expert routed --out \$OUT/ffn24_shared_routed.json" \
      "@60 $NOCB $AFD_ROLE --runs 1x512 --role ffn --layers 8 --trace --shared-expert routed --out \$OUT/ffn8_b512_routed_trace.json"
    ;;
  21)
    FULL="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 $AFD_ROLE --full --role ffn"
    $RUN -t 60 "$OUT_DIR/call21" \
      "@150 $FULL --runs 1x256 --out \$OUT/ffn_full_256.json" \
      "@150 $FULL --runs 1x512 --out \$OUT/ffn_full_512.json"
    ;;
  23)
    $RUN -t 60 "$OUT_DIR/call23" \
      "@150 python3 benchmarks/bench_vision_mlp.py --out \$OUT/vision_mlp.json" \
      "@120 $GPU_TESTS tests/pallas_kernels/test_grouped_gemm.py" \
      "@110 $NOCB $AFD_ROLE --runs 1x256 --role attention --full --trace --out \$OUT/attention61_nocmdbuf.json"
    ;;
  24)
    $RUN -t 60 "$OUT_DIR/call24" \
      "@150 $GPU_TESTS tests/vision/test_vision_mlp.py tests/pallas_kernels/test_grouped_gemm.py -k 'bias or mlp or bf16'" \
      "@90 python3 benchmarks/bench_vision_mlp.py --configs 2wg_n_128x256 --out \$OUT/vision_mlp.json" \
      "@150 python3 benchmarks/bench_vision.py --iters 10 --size 728 --no-torch --no-fp8 --trace --out \$OUT/vision_728.json" \
      "@60 python3 benchmarks/bench_router.py --out \$OUT/router.json" \
      "@90 XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true python3 benchmarks/bench_vision.py --iters 10 --size 728 --no-torch --no-fp8 --out \$OUT/vision_728_cudnn_ln.json"
    ;;
  25)
    $RUN -t 60 "$OUT_DIR/call25" \
      "@150 $VISION --iters 10 --trace --out \$OUT/vision_728.json" \
      "@90 python3 benchmarks/bench_vision_attention.py --out \$OUT/vision_attention.json" \
      "@100 XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=0 $VISION --iters 10 --out \$OUT/vision_728_no_dot_merger.json"
    ;;
  26)
    FULL="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 $AFD_ROLE --full --role ffn"
    $RUN -t 60 "$OUT_DIR/call26" \
      "@150 $VISION --iters 10 --trace --out \$OUT/vision_728.json" \
      "@100 XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=0 $VISION --iters 10 --trace --out \$OUT/vision_728_no_dot_merger.json"
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      $RUN -t 60 "$OUT_DIR/call26_ffn" \
        "@150 $FULL --runs 1x256 --out \$OUT/ffn_full_256.json" \
        "@150 $FULL --runs 1x512 --out \$OUT/ffn_full_512.json"
    fi
    ;;
  27)
    FULL="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 $AFD_ROLE --full"
    $RUN -t 60 "$OUT_DIR/call27" \
      "@100 $VISION --iters 10 --trace --out \$OUT/vision_728.json" \
      "@70 $NOCB $VISION --iters 10 --out \$OUT/vision_728_nocmdbuf.json" \
      "@110 $FULL --runs 1x256 --role attention --out \$OUT/attention_full_256.json" \
      "@150 $FULL --runs 1x256 --role ffn --out \$OUT/ffn_full_256.json" \
      "@150 $FULL --runs 1x512 --role ffn --out \$OUT/ffn_full_512.json"
    ;;
  28)
    $RUN -t 60 "$OUT_DIR/call28" \
      "@330 $GPU_TESTS tests" \
      "@70 $VISION --iters 10 --out \$OUT/vision_728.json" \
      "@70 $NOCB $VISION --iters 10 --out \$OUT/vision_728_nocmdbuf.json"
    ;;
  29)
    $RUN -t 60 "$OUT_DIR/call29" \
      "@70 $VISION --iters 5 --host-costs --out \$OUT/vision_728_host.json" \
      "@110 $AFD_ROLE --runs 1x256,1x512 --role ffn --layers 24 --out \$OUT/ffn24.json" \
      "@110 $AFD_ROLE --runs 1x256 --role attention --full --out \$OUT/attention61.json"
    ;;
  22)
    ROLE="$AFD_ROLE --runs 1x256,1x512 --role ffn --layers 24 --shared-expert routed"
    $RUN -t 40 "$OUT_DIR/call22" \
      "@100 $GPU_TESTS tests/pallas_kernels/test_grouped_gemm.py" \
      "@80 $ROLE --moe-dispatch sort --out \$OUT/ffn24_dispatch_sort.json" \
      "@80 $ROLE --out \$OUT/ffn24_dispatch_count.json"
    ;;
  *) echo "call must be 1 to 29, got $CALL" >&2; exit 2 ;;
esac
