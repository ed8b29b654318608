"""TinyCLIP: CLIP models, contrastive training and distillation by affinity mimicking and weight inheritance.

Components (``flowforge plugins --options NAME`` lists each one's options):

* backbone ``clip`` — ViT image tower + causal text tower (`plugins.tinyclip.model`), optionally
  initialised from a larger CLIP by weight inheritance (``inherit_from``, `plugins.tinyclip.inherit`);
* objectives ``clip_contrastive`` and ``tinyclip_distill`` (`plugins.tinyclip.losses`);
* data ``clip_shapes``, ``clip_digits``, ``clip_pairs`` (`plugins.tinyclip.data`);
* metric ``zero_shot`` (`plugins.tinyclip.zeroshot`).

Teachers load from flowforge run directories or checkpoints and from Hugging Face CLIP
directories (`plugins.tinyclip.load`, `plugins.tinyclip.hf`).
"""

from registry import hookimpl

FLOWFORGE_API = 1
_P = "plugins.tinyclip"


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("backbone", "clip", f"{_P}.model:make_clip", f"{_P}.model:CLIPConfig",
             doc="CLIP: ViT image tower + causal text tower; weight inheritance with inherit_from")
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
    register("metric", "zero_shot", f"{_P}.zeroshot:make_zero_shot", f"{_P}.zeroshot:ZeroShotConfig",
             doc="zero-shot top-1/top-5 accuracy and image<->text retrieval recall@1/5 on held-out pairs")
