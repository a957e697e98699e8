"""The published configurations of the default checkpoints, for random-weight models of the real shapes.

No model hub is reachable here, so the CLIP and SigLIP2 towers cannot be tested with real weights; these
builders give models whose every shape, preprocessing setting and graph input/output is the published
checkpoint's, with random weights and fewer layers (CI time: a full 12-layer ViT-B/32 export is about a
minute on two cores; depth changes no input, output, width or setting that uclip reads).

laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K (the paper's default), from its open_clip_config.json
(embed_dim 512; vision: image_size 224, patch_size 32, width 768, 12 layers; text: context_length 77,
vocab_size 49408, width 512, 8 heads, 12 layers; mean 0.48145466/0.4578275/0.40821073, std
0.26862954/0.26130258/0.27577711) and the transformers conversions of LAION's DataComp CLIPs
(hidden_act "gelu", not OpenAI's quick_gelu; intermediate 4 x width; CLIPImageProcessor shortest_edge 224,
centre crop 224, resample 3 = bicubic; tokenizer model_max_length 77, lower-cased, padded with
<|endoftext|>).
google/siglip2-base-patch32-256 (the backbone-transfer variant), from its config.json (model_type
"siglip"; vision image_size 256, patch_size 32; text vocab_size 256000; every other value the SiglipConfig
default: width 768, 12 layers, 12 heads, intermediate 3072, 64 text positions) and preprocessor_config.json
(SiglipImageProcessor: size 256 x 256, resample 2 = bilinear, rescale 1/255, mean 0.5, std 0.5; text
lower-cased and padded to 64 tokens).

Kept from the tiny models (tests/tiny_models.py): the tokenizers (the real CLIP BPE and Gemma vocabularies
cannot be had offline; every id the tiny ones produce is a valid row), hence the token ids of <bos>/<eos>/
<pad>; and SigLIP2's text vocabulary is cut to the tokenizer's size (256,000 x 768 would be a 786 MB
embedding table to export in CI for rows no test can reach).
"""
from __future__ import annotations

from pathlib import Path

CLIP_DATACOMP_B32 = {
    "source": "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
    "projection_dim": 512,
    "text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                 max_position_embeddings=77, hidden_act="gelu"),
    "vision": dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                   hidden_act="gelu"),
    "layers": 12,
    "image_processor": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                            resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                            image_std=[0.26862954, 0.26130258, 0.27577711]),
}

SIGLIP2_B32_256 = {
    "source": "google/siglip2-base-patch32-256",
    "text": dict(vocab_size=256000, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 max_position_embeddings=64),
    "vision": dict(image_size=256, patch_size=32, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    "layers": 12,
    "image_processor": dict(size={"height": 256, "width": 256}, resample=2, image_mean=[0.5, 0.5, 0.5],
                            image_std=[0.5, 0.5, 0.5]),
}


def make_reference_clip(directory: Path, *, layers: int = 1, seed: int = 0) -> Path:
    """CLIP ViT-B/32 DataComp's shapes and settings, `layers` deep in each tower, random weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tiny_models import _clip_tokenizer

    spec = CLIP_DATACOMP_B32
    tokenizer = _clip_tokenizer(spec["text"]["max_position_embeddings"])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=dict(spec["text"], num_hidden_layers=layers, **ids),
                        vision_config=dict(spec["vision"], num_hidden_layers=layers),
                        projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(directory)
    image_processor = CLIPImageProcessor(**spec["image_processor"])
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return Path(directory)


def make_reference_siglip2(directory: Path, *, layers: int = 1, seed: int = 0) -> Path:
    """SigLIP2 base patch32 256's shapes and settings (text vocabulary cut to the tokenizer), random weights."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    from tiny_models import _siglip2_tokenizer

    spec = SIGLIP2_B32_256
    tokenizer = _siglip2_tokenizer(spec["text"]["max_position_embeddings"])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text = dict(spec["text"], vocab_size=len(tokenizer), num_hidden_layers=layers, **ids)
    config = SiglipConfig(text_config=text, vision_config=dict(spec["vision"], num_hidden_layers=layers))
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(directory)
    image_processor = SiglipImageProcessor(**spec["image_processor"])
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return Path(directory)
