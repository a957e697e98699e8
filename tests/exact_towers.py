"""Exact (float64) references of the tiny checkpoints' towers, written against transformers directly.

They are independent of export/towers.py on purpose (the code under test): pooling and normalisation
are written out here. A checkpoint's float32 weights widen to float64 exactly, so each reference is
the exact value of the function a bundle graph computes in float32; `rounding.assert_float32_run_of`
bounds how far a float32 run may lie from it.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from uclip_cli import bundle as B


def normalised(x) -> torch.Tensor:
    x = x if torch.is_tensor(x) else x.pooler_output
    return torch.nn.functional.normalize(x, dim=-1)


def mean_pooled(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the unmasked positions, L2-normalised."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask[..., None].to(hidden.dtype)
    return normalised((hidden * mask).sum(1) / mask.sum(1))


@lru_cache(maxsize=8)
def exact_model(cls, directory: Path):
    """The checkpoint in float64 (its float32 weights widened exactly), eager attention."""
    return cls.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager").eval()


def exact_tower(checkpoints, graph: str) -> Callable[..., torch.Tensor]:
    """The float64 function the tiny bundle's `graph` computes, fed the graph's inputs in its order."""
    from transformers import AutoModel, CLIPModel

    if graph == B.IMAGE_ENCODER:
        clip = exact_model(CLIPModel, checkpoints.clip)
        return lambda pixel_values: normalised(clip.get_image_features(pixel_values=pixel_values))
    if graph == B.TEXT_CLIP:
        clip = exact_model(CLIPModel, checkpoints.clip)
        return lambda ids, mask: normalised(clip.get_text_features(input_ids=ids, attention_mask=mask))
    if graph == B.TEXT_MULTILINGUAL:
        multi = exact_model(AutoModel, checkpoints.multilingual)
        return lambda ids, mask: mean_pooled(multi, ids, mask)
    raise ValueError(graph)


def pixels_of(path: Path, bundle: Path):
    """The image encoder's input [1, 3, S, S] for a file, decoded and preprocessed as `uclip index` does."""
    from uclip_cli.images import decode_image, preprocess

    settings = B.load_bundle(bundle, verify=False).image
    return preprocess(decode_image(Path(path).read_bytes(), name=str(path), target_size=settings.size), settings)[None]


def assert_same_image_vectors(got: dict, want: dict, checkpoints, bundle: Path) -> None:
    """Two indexes of the same files (no heads) hold the same image vector for each path.

    Bit-equal vectors pass at once; where the two runs rounded differently (other batches, other
    kernels), each must lie within float32 rounding of the exact vector of that file's pixels.
    A vector of another image, a stale or a torn one is far outside.
    """
    from rounding import assert_float32_run_of, exact_inputs

    assert got.keys() == want.keys()
    encoder = exact_tower(checkpoints, B.IMAGE_ENCODER)
    for path in want:
        if got[path].tobytes() != want[path].tobytes():
            exact = exact_inputs(pixels_of(Path(path), bundle))
            assert_float32_run_of(got[path][None], encoder, exact, what=path)
            assert_float32_run_of(want[path][None], encoder, exact, what=path)
