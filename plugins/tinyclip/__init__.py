"""TinyCLIP: CLIP models, contrastive training and distillation by affinity mimicking and weight inheritance.

Components (``flowforge plugins --options NAME`` lists each one's options):

* backbone ``clip`` — ViT image tower + causal text tower (`plugins.tinyclip.model`), optionally
  initialised from a larger CLIP by weight inheritance (``inherit_from``, `plugins.tinyclip.inherit`);
* backbone ``clip_l0`` — the same under learnable L0 masks, and objective ``tinyclip_l0``, for
  automatic inheritance (`plugins.tinyclip.autoinherit`, `plugins.tinyclip.l0`, `plugins.tinyclip.prune`);
* objectives ``clip_contrastive`` and ``tinyclip_distill`` (`plugins.tinyclip.losses`);
* data ``clip_shapes``, ``clip_digits``, ``clip_pairs`` (`plugins.tinyclip.data`) and ``clip_shards``
  (webdataset-format tar shards, `plugins.tinyclip.shards`);
* metrics ``zero_shot`` (`plugins.tinyclip.zeroshot`) and ``zeroshot`` (CLIP's protocol with the 80
  OpenAI templates, sharded over processes; `plugins.tinyclip.zeroshot_protocol`).

Teachers load from flowforge run directories or checkpoints, Hugging Face CLIP directories and
OpenAI / open_clip / TinyCLIP weight files (`plugins.tinyclip.load`, `plugins.tinyclip.hf`,
`plugins.tinyclip.openclip`). Captions use a word-level tokenizer or CLIP's BPE (`plugins.tinyclip.bpe`).
"""

from registry import hookimpl

FLOWFORGE_API = 1
_P = "plugins.tinyclip"


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("backbone", "clip", f"{_P}.model:make_clip", f"{_P}.model:CLIPConfig",
             doc="CLIP: ViT image tower + causal text tower; weight inheritance with inherit_from")
    register("backbone", "clip_l0", f"{_P}.autoinherit:make_clip_l0", f"{_P}.autoinherit:MaskedCLIPConfig",
             doc="CLIP under learnable hard-concrete L0 masks (TinyCLIP's automatic inheritance)")
    register("objective", "tinyclip_l0", f"{_P}.autoinherit:make_tinyclip_l0", f"{_P}.losses:DistillConfig",
             doc="tinyclip_distill plus the L0 sparsity penalty of a clip_l0 backbone (multipliers ascended)")
    register("objective", "clip_contrastive", f"{_P}.losses:make_clip_contrastive", f"{_P}.losses:ContrastiveConfig",
             doc="symmetric InfoNCE over the global batch; cached-feature accumulation (accum_chunks)")
    register("objective", "tinyclip_distill", f"{_P}.losses:make_tinyclip_distill", f"{_P}.losses:DistillConfig",
             doc="TinyCLIP affinity mimicking from a frozen teacher CLIP, alpha-mixed with the contrastive loss")
    register("data", "clip_shapes", f"{_P}.data:make_clip_shapes", f"{_P}.data:ShapesConfig",
             doc="procedural coloured shapes with compositional captions (colour x shape x position)")
    register("data", "clip_digits", f"{_P}.data:make_clip_digits", f"{_P}.data:DigitsCaptionConfig",
             doc="8x8 digits resized, captioned from templates ('a handwritten seven')")
    register("data", "clip_pairs", f"{_P}.data:make_clip_pairs", f"{_P}.data:PairsConfig",
             doc="image-caption pairs from a CSV/TSV (filepath,caption) or JSONL file")
    register("data", "clip_shards", f"{_P}.shards:make_clip_shards", f"{_P}.shards:ShardsConfig",
             doc="image-caption pairs in webdataset-format tar shards (KEY.jpg/png + KEY.txt), read lazily")
    register("metric", "zero_shot", f"{_P}.zeroshot:make_zero_shot", f"{_P}.zeroshot:ZeroShotConfig",
             doc="zero-shot top-1/top-5 accuracy and image<->text retrieval recall@1/5 on held-out pairs")
    register("metric", "zeroshot", f"{_P}.zeroshot_protocol:make_zeroshot",
             f"{_P}.zeroshot_protocol:ZeroShotProtocolConfig",
             doc="CLIP's zero-shot protocol: 80 OpenAI templates, top-1/5, retrieval R@1/5/10, sharded over ranks")
