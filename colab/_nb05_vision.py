"""Cells of colab/05_vision.ipynb (built by _build_notebooks.py)."""

from _build_notebooks import INSTALL

CELLS = [
    (
        "md",
        """\
# 05 · Step3-VL: an image through the vision half

Step-3 is a vision-language model: a 63-layer ViT, two convolutional downsamplers and a
projector turn each image view into rows of the text model's embeddings, which replace the
`<im_patch>` placeholders of the prompt (docs/vision.md). This notebook builds a **tiny random**
Step3-VL model (the release's structure and token layout at toy width), draws an image, shows
how preprocessing cuts it into a global view plus crops and where their tokens go in the prompt,
generates a few tokens, and plots where the first generated token's attention falls on the
image. The weights are random, so the generated text and the attention map are only a
demonstration of the plumbing; the same code runs on a real checkpoint loaded with
`step3_jax.checkpoints.load_hf_vl`. Runs on CPU in well under a minute.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from step3_jax.config import Step3Config
from step3_jax.layers.mfa import mfa_attention_xla
from step3_jax.policy import KernelPolicy
from step3_jax.vision import ImageSpecialTokens, Step3VisionConfig, Step3VLModel, preprocess_images
from step3_jax.vision import generate as vgen
from step3_jax.vision.preprocess import MEAN, STD, plan_crops

print("jax", jax.__version__, "| devices:", jax.devices()[:2])""",
    ),
    (
        "md",
        """\
## 1. A tiny random Step3-VL model

`Step3VisionConfig.tiny()` keeps the real token layout (728 px global view and 504 px crops,
patch 14, two stride-2 downsamplers: 13 x 13 = 169 tokens per view, 9 x 9 = 81 per crop) at
width 32 with 2 layers; `Step3Config.tiny()` is the text model. The image markup tokens get
small ids of the tiny vocabulary (a real checkpoint's come from its tokenizer:
`ImageSpecialTokens.from_tokenizer`).""",
    ),
    (
        "code",
        """\
text_cfg = Step3Config.tiny()
SPECIAL = ImageSpecialTokens(image=7, im_start=1, im_end=2, patch_start=3, patch_end=4, patch_newline=5)
vis_cfg = Step3VisionConfig.tiny(text_hidden_size=text_cfg.hidden_size, image_token_id=SPECIAL.image)
model = Step3VLModel.create(
    text_cfg, vis_cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
    policy=KernelPolicy.reference(),
)
count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
print(f"text model {count(model.text):,} parameters, vision half {count(model.vision):,}")""",
    ),
    (
        "md",
        """\
## 2. An image, its global view and its crops

A 1000 x 600 drawing. Its longer side reaches 728 px, so it gets 504 px windows: the image is
resized to 1008 x 504 (each side rounded to a multiple of 504) and cut into 2 crops, beside the
global view (the whole image squeezed to 728 x 728). The grid lines mark what one image token
covers: 4 x 4 patches of 14 px (56 px) after the two downsamplers.""",
    ),
    (
        "code",
        """\
W, H = 1000, 600
yy, xx = np.mgrid[0:H, 0:W]
image = Image.fromarray(np.stack([255 * xx / W, 255 * yy / H, 128 + 0 * xx], -1).astype(np.uint8))
draw = ImageDraw.Draw(image)
draw.ellipse((120, 140, 420, 440), fill=(250, 240, 40))
draw.rectangle((600, 80, 900, 300), fill=(30, 30, 200))
draw.polygon([(650, 560), (800, 360), (950, 560)], fill=(230, 40, 40))

pre = preprocess_images([image], vis_cfg)
layout, plan = pre.layouts[0], plan_crops(W, H)
print("global views", pre.pixel_values.shape, "| crops", pre.crop_pixel_values.shape)
print(layout)


def to_rgb(chw):
    \"\"\"Normalized [3, P, P] pixels back to an RGB image in [0, 1].\"\"\"
    return np.clip(chw.transpose(1, 2, 0) * np.asarray(STD) + np.asarray(MEAN), 0, 1)


def grid(ax, size, cells):
    \"\"\"White lines around the pixels of each image token (cells x cells tokens).\"\"\"
    for t in np.linspace(0, size, cells + 1) - 0.5:
        ax.axhline(t, color="w", lw=0.4, alpha=0.6)
        ax.axvline(t, color="w", lw=0.4, alpha=0.6)
    ax.set_xlim(-0.5, size - 0.5), ax.set_ylim(size - 0.5, -0.5)


fig, axes = plt.subplots(1, 2 + layout.num_crops, figsize=(4 * (2 + layout.num_crops), 3.6))
axes[0].imshow(image)
sx, sy = W / plan.crop_size[0], H / plan.crop_size[1]
for i, (x, y, w, h) in enumerate(plan.boxes):
    axes[0].add_patch(plt.Rectangle((x * sx, y * sy), w * sx, h * sy, fill=False, ec="k", lw=2, ls="--"))
    axes[0].text(x * sx + 10, y * sy + 40, f"crop {i}", color="k", fontsize=11)
axes[0].set_title(f"input {W} x {H}")
axes[1].imshow(to_rgb(pre.pixel_values[0]))
grid(axes[1], vis_cfg.image_size, 13)
axes[1].set_title("global view 728 px: 13 x 13 tokens")
for i, crop in enumerate(pre.crop_pixel_values):
    axes[2 + i].imshow(to_rgb(crop))
    grid(axes[2 + i], vis_cfg.crop_size, 9)
    axes[2 + i].set_title(f"crop {i}, 504 px: 9 x 9 tokens")
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
plt.tight_layout(); plt.show()""",
    ),
    (
        "md",
        """\
## 3. The placeholder layout

The user's prompt holds ONE `<im_patch>` per image; `expand_prompt` replaces it by the image's
layout: per crop `<patch_start> <im_patch> x 81 <patch_end>` (a `<patch_newline>` after a crop
that ends a row of windows, except the last), then `<im_start> <im_patch> x 169 <im_end>` for the
global view. Only `<im_patch>` positions receive image features, in this order (crops, then the
global view); the markup tokens keep their text embeddings. `vgen.prepare` does the expansion
and runs the tower once per view.""",
    ),
    (
        "code",
        """\
prompt = [9, SPECIAL.image, 20, 21, 22]  # text, the image, text
expanded, features = vgen.prepare(model, [prompt], [[image]], SPECIAL)
ids = np.asarray(expanded[0])
print(f"prompt {len(prompt)} tokens -> {len(ids)} after expansion; features {features.shape}")

# colour each position by what it is: text, markup, a crop's feature row, a global-view row
where = np.flatnonzero(ids == SPECIAL.image)
kind = np.zeros(len(ids), int)  # 0: text
kind[np.isin(ids, [SPECIAL.im_start, SPECIAL.im_end, SPECIAL.patch_start, SPECIAL.patch_end, SPECIAL.patch_newline])] = 1
kind[where[: layout.num_crops * layout.crop_tokens]] = 2
kind[where[layout.num_crops * layout.crop_tokens :]] = 3
cols = 32
rows = -(-len(ids) // cols)
cells = np.full(rows * cols, np.nan)
cells[: len(ids)] = kind
cmap = plt.matplotlib.colors.ListedColormap(["#999999", "#222222", "#e69f00", "#56b4e9"])
fig, ax = plt.subplots(figsize=(9, 3.2))
ax.imshow(cells.reshape(rows, cols), cmap=cmap, vmin=-0.5, vmax=3.5)
ax.set_xticks([]), ax.set_yticks([])
ax.set_title(f"the expanded prompt, {cols} positions per row")
labels = ["text", "markup (<patch_start>, <im_start>, ...)", "<im_patch>: crop features", "<im_patch>: global view"]
ax.legend(handles=[plt.matplotlib.patches.Patch(color=cmap(i), label=l) for i, l in enumerate(labels)],
          loc="upper left", bbox_to_anchor=(1.01, 1))
plt.tight_layout(); plt.show()""",
    ),
    (
        "md",
        """\
## 4. Image embeddings and generation

`model.embed_images(pixel_values)` is the whole vision half: normalized pixels
`[N, 3, 728, 728]` -> projector output `[N, 169, text_hidden]`. `vgen.generate` runs it at
prefill only (once per view), merges the rows at the placeholders, prefills the text model and
decodes with the text model's on-device loop.""",
    ),
    (
        "code",
        """\
print("embed_images:", pre.pixel_values.shape, "->", model.embed_images(pre.pixel_values).shape)
res = vgen.generate(model, [prompt], 8, images=[[image]], special=SPECIAL)  # greedy
print("generated ids:", res.tokens[0])
print(f"prefill (preprocessing + vision tower + text prefill) {res.prefill_seconds:.2f} s")""",
    ),
    (
        "md",
        """\
## 5. Where the first generated token looks

The first generated token enters the model at position `len(ids)`. Its query in the LAST layer
attends to every earlier key; the helper below recomputes that layer's queries and keys with
the model's own layers (`attention_qkv`: input norm, projections, RoPE), takes the softmax of
`q k^T / sqrt(head_dim)` for that query and averages it over the heads. A check inside it: the
probabilities times V give exactly the layer's attention output for that position. The 169
global-view positions are then reshaped to the 13 x 13 token grid and laid over the view.""",
    ),
    (
        "code",
        """\
def last_layer_attention(model, ids, features, token):
    \"\"\"Head-averaged attention probabilities [S] of ``token``'s query, appended at position
    len(ids), in the last text layer, over the S = len(ids) + 1 keys.\"\"\"
    tokens = jnp.asarray([list(ids) + [token]], jnp.int32)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    policy = model.text.policy
    x = model.embed(tokens, features)  # image rows merged at the placeholders
    for layer in model.text.layers[:-1]:
        x, _ = layer(x, positions, None, policy)
    q, k, v = model.text.layers[-1].attention_qkv(x, positions, policy)  # [1,S,N,H], [1,S,H]
    scores = jnp.einsum("NH,SH->NS", q[0, -1], k[0]) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [N heads, S]
    o = mfa_attention_xla(q, k, v, positions, kv_positions=positions)[0, -1]
    np.testing.assert_allclose(jnp.einsum("NS,SH->NH", probs, v[0]), o, rtol=1e-4, atol=1e-5)
    return np.asarray(probs.mean(0))


p = last_layer_attention(model, ids, features, res.tokens[0][0])
view_pos = where[layout.num_crops * layout.crop_tokens :]  # the global view's 169 positions
heat = p[view_pos].reshape(13, 13)
print(f"attention mass: all image rows {p[where].sum():.3f}, global view {heat.sum():.3f}, "
      f"text and markup {1 - p[where].sum():.3f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
axes[0].imshow(to_rgb(pre.pixel_values[0]))
im = axes[0].imshow(heat, cmap="magma", alpha=0.6, extent=(-0.5, 727.5, 727.5, -0.5), interpolation="nearest")
fig.colorbar(im, ax=axes[0], fraction=0.046)
axes[0].set_title("first generated token -> global view (last layer, mean over heads)")
axes[0].set_xticks([]), axes[0].set_yticks([])
axes[1].bar(np.arange(len(p)), p, width=1.0, color=cmap(np.append(kind, 0)))
axes[1].set_xlabel("key position (colours as in section 3; the last is the token itself)")
axes[1].set_ylabel("probability")
axes[1].set_title("the same query over the whole prompt")
plt.tight_layout(); plt.show()""",
    ),
    (
        "md",
        """\
With a real checkpoint: `model = checkpoints.load_hf_vl(path)`, `tok =
checkpoints.load_tokenizer(path)`, `SPECIAL = ImageSpecialTokens.from_tokenizer(tok)`, and the
cells above unchanged. From the shell: `step3-jax generate --checkpoint DIR --image photo.jpg
--prompt "Describe this image."`, or `step3-jax chat --checkpoint DIR --image photo.jpg`
(`/image PATH` attaches one to the next turn).""",
    ),
]
