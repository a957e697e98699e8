"""The frozen encoders as plain torch modules with the bundle's inputs and outputs (see uclip_cli/bundle.py).

Every tower returns L2-normalised float32 embeddings and is put in eval mode (no dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _features(output) -> torch.Tensor:
    """transformers 5.x get_*_features may return a ModelOutput whose pooler_output holds the projected features."""
    if torch.is_tensor(output):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where attention_mask is 1 (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class _Frozen(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "_Frozen":
        return super().train(False)


class ImageTower(_Frozen):
    """pixel_values f32[B,3,H,W] -> embeddings f32[B,d_clip]: CLIP/SigLIP get_image_features, L2-normalised."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)


class ClipTextTower(_Frozen):
    """input_ids, attention_mask i64[B,T] -> embeddings f32[B,d_clip]: get_text_features, L2-normalised.

    `use_attention_mask=False` for SigLIP, whose text tower is trained on fixed-length padded text
    without a mask (the pads are attended); the input stays in the graph so that every text tower
    has the same signature.
    """

    def __init__(self, model: nn.Module, *, use_attention_mask: bool = True):
        super().__init__(model)
        self.use_attention_mask = use_attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.use_attention_mask:
            features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        else:
            features = self.model.get_text_features(input_ids=input_ids)
            # Keeps attention_mask a live graph input without changing the result.
            features = _features(features) + 0 * attention_mask[:, :1].to(torch.float32)
        return F.normalize(_features(features), dim=-1)


class MultilingualTower(_Frozen):
    """input_ids, attention_mask i64[B,T] -> embeddings f32[B,d_multi]: last_hidden_state, masked mean, L2."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(masked_mean(hidden, attention_mask), dim=-1)
