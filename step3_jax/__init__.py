"""step3_jax: Step-3 (MFA attention + Attention-FFN Disaggregation) decoding in JAX.

The public names below load on first use (PEP 562), so importing a leaf module such as
`step3_jax.quant` or a kernel package (`step3_jax.kernels.*`) does not import the model: the
package has no import cycles to dodge.

Subpackages: `step3_jax.layers`, `step3_jax.kernels` (Pallas kernels), `step3_jax.sharding`
(AFD), `step3_jax.checkpoints` (HF safetensors, orbax, the demo model), `step3_jax.cost`;
module `step3_jax.chat` (chat templates, `chat_generate`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DecoderLayer": "step3_jax.model",
    "GenerationResult": "step3_jax.decode",
    "KVCache": "step3_jax.cache",
    "KernelPolicy": "step3_jax.policy",
    "MFAttention": "step3_jax.layers",
    "MoE": "step3_jax.layers",
    "RMSNorm": "step3_jax.layers",
    "SamplingConfig": "step3_jax.sampling",
    "Step3Config": "step3_jax.config",
    "Step3Model": "step3_jax.model",
    "SwiGLU": "step3_jax.layers",
    "chat_generate": "step3_jax.chat",
    "decode_step": "step3_jax.decode",
    "generate": "step3_jax.decode",
    "make_decode_step": "step3_jax.decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'step3_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
