"""Tiny random-weight checkpoints of the real architectures, saved like the Hugging Face originals.

Nothing is downloaded: each function builds a transformers config, random weights (seeded) and a
tokenizer trained on the spot with the original's tokenizer class, and writes them with
`save_pretrained` so that `from_pretrained(dir)` / `AutoTokenizer` / `AutoProcessor` load them.

- make_tiny_clip:              CLIPModel (+ CLIPTokenizer BPE, CLIPImageProcessor settings)
- make_tiny_siglip:            SiglipModel, the architecture of the fixed-resolution SigLIP2 checkpoints
                               (google/siglip2-base-patch32-256 is model_type "siglip"), with the SigLIP2
                               Gemma-style lower-casing tokenizer and SiglipImageProcessor settings
- make_tiny_sentence_encoder:  BertModel / XLMRobertaModel in sentence-transformers layout, mean pooling

`full_size=True` gives the real shapes (ViT-B/32 CLIP with 512-d projection; MiniLM-L12 / XLM-R
vocabulary sizes) with random weights, for benchmarks. Their tokenizers stay the tiny trained
ones: every id they produce is a valid row of the full-size embedding table.
"""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
XM3600_CAPTIONS = REPO_ROOT.parent / "shared" / "data" / "xm3600" / "captions.jsonl"

# Used only when the XM3600 captions are not next to the repository.
FALLBACK_SENTENCES = {
    "en": ["A dog runs on the beach.", "Two cats sleeping on a red sofa.", "A man riding a bicycle in the city.",
           "A bowl of fruit on a wooden table.", "Children playing football in a park.", "A white boat on a calm lake."],
    "de": ["Ein Hund läuft am Strand.", "Zwei Katzen schlafen auf einem roten Sofa.", "Ein Mann fährt Fahrrad in der Stadt."],
    "fr": ["Un chien court sur la plage.", "Deux chats dorment sur un canapé rouge.", "Un bol de fruits sur une table."],
    "es": ["Un perro corre en la playa.", "Dos gatos duermen en un sofá rojo.", "Niños jugando al fútbol en un parque."],
    "cs": ["Pes běží po pláži.", "Dvě kočky spí na červené pohovce.", "Muž jede na kole ve městě."],
    "fi": ["Koira juoksee rannalla.", "Kaksi kissaa nukkuu punaisella sohvalla.", "Mies ajaa pyörällä kaupungissa."],
    "hr": ["Pas trči po plaži.", "Dvije mačke spavaju na crvenom kauču.", "Čovjek vozi bicikl u gradu."],
    "hu": ["Egy kutya fut a tengerparton.", "Két macska alszik egy piros kanapén.", "Egy férfi biciklizik a városban."],
    "ro": ["Un câine aleargă pe plajă.", "Două pisici dorm pe o canapea roșie.", "Un bărbat merge cu bicicleta în oraș."],
    "ru": ["Собака бежит по пляжу.", "Две кошки спят на красном диване."],
    "ja": ["浜辺を走る犬。", "赤いソファで眠る二匹の猫。"],
    "zh": ["一只狗在海滩上奔跑。", "两只猫睡在红色沙发上。"],
    "ar": ["كلب يركض على الشاطئ.", "قطتان تنامان على أريكة حمراء."],
}

TINY_IMAGE_SIZE = 64
TINY_PATCH = 16
TINY_HIDDEN = 32
TINY_CLIP_PROJECTION = 24   # differs from every hidden size, so a dims mix-up cannot pass unnoticed
SIGLIP_TEXT_LENGTH = 64
SENTENCE_MAX_SEQ_LENGTH = 128


def training_sentences(languages: tuple[str, ...] | None = None, per_language: int = 300) -> list[str]:
    """Captions from XM3600 (the first `per_language` per language), or the built-in fallback list."""
    if XM3600_CAPTIONS.is_file():
        by_language: dict[str, list[str]] = {}
        with XM3600_CAPTIONS.open(encoding="utf-8") as f:
            for line in islice(f, per_language):
                for lang, caption in json.loads(line)["captions"].items():
                    if languages is None or lang in languages:
                        by_language.setdefault(lang, []).append(caption)
        return [s for lang in sorted(by_language) for s in by_language[lang]]
    return [s for lang, sents in FALLBACK_SENTENCES.items() if languages is None or lang in languages for s in sents]


TOKENIZER_VOCABS = Path(__file__).resolve().parent / "data" / "tokenizers"


def _learned_model(name: str, tokenizer_cls, trainer, sentences: list[str], **kwargs) -> dict:
    """The vocabulary (and merges) learned on `sentences`, kept in tests/data/tokenizers/NAME.json.

    The `tokenizers` trainers break frequency ties in a randomly seeded hash order, so two trainings on
    the same text give different ids; the first training is stored so that token ids, and so text-query
    scores, are the same in every test session. Delete the file to train it again.
    """
    stored = TOKENIZER_VOCABS / f"{name}.json"
    if stored.is_file():
        return json.loads(stored.read_text(encoding="utf-8"))
    blank = tokenizer_cls(**kwargs)
    backend = blank.backend_tokenizer
    backend.train_from_iterator(sentences, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(model, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return model


def _train(name: str, tokenizer_cls, trainer, sentences: list[str], *, extra_tokens: tuple[str, ...] = (), **kwargs):
    """Train the backend pipeline of a transformers tokenizer class, then rebuild the class on the learned vocab.

    `extra_tokens` are appended to a BPE vocabulary when missing (CLIP keeps every byte, alone and word-final).
    """
    model = _learned_model(name, tokenizer_cls, trainer, sentences, **kwargs)
    if model["type"] == "BPE":
        for token in extra_tokens:
            model["vocab"].setdefault(token, len(model["vocab"]))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return tokenizer_cls(vocab=model["vocab"], merges=merges, **kwargs)
    if model["type"] == "Unigram":
        return tokenizer_cls(vocab=[tuple(v) for v in model["vocab"]], **kwargs)
    return tokenizer_cls(vocab=model["vocab"], **kwargs)


def _clip_tokenizer(max_length: int):
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    every_byte = sorted(pre_tokenizers.ByteLevel.alphabet())
    return _train("clip", CLIPTokenizer, trainer, training_sentences(("en",), per_language=600),
                  extra_tokens=tuple(every_byte) + tuple(b + "</w>" for b in every_byte), model_max_length=max_length)


def _siglip2_tokenizer(max_length: int):
    from tokenizers import trainers
    from transformers import Siglip2Tokenizer

    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], show_progress=False
    )
    return _train("siglip2", Siglip2Tokenizer, trainer, training_sentences(per_language=40), model_max_length=max_length)


def _bert_tokenizer(max_length: int):
    from tokenizers import trainers
    from transformers import BertTokenizer

    trainer = trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        limit_alphabet=3000, show_progress=False,
    )
    # Multilingual BERT-style: cased, accents kept.
    return _train("bert", BertTokenizer, trainer, training_sentences(per_language=100),
                  do_lower_case=False, strip_accents=False, model_max_length=max_length)


def _xlmr_tokenizer(max_length: int):
    from tokenizers import trainers
    from transformers import XLMRobertaTokenizer

    trainer = trainers.UnigramTrainer(
        vocab_size=2000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>",
        show_progress=False,
    )
    return _train("xlm-roberta", XLMRobertaTokenizer, trainer, training_sentences(per_language=60), model_max_length=max_length)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def make_tiny_clip(directory: str | Path, *, seed: int = 0, full_size: bool = False) -> Path:
    """CLIPModel + CLIPTokenizer + CLIPImageProcessor settings, loadable with CLIPModel/AutoProcessor.from_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory = Path(directory)
    tokenizer = _clip_tokenizer(77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if full_size:   # ViT-B/32 (openai / laion DataComp-XL shapes)
        text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, **ids)
        vision = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12)
        projection = 512
    else:
        text = dict(vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, **ids)
        vision = dict(image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, hidden_size=TINY_HIDDEN,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        projection = TINY_CLIP_PROJECTION
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    _seeded(seed)
    CLIPModel(config).eval().save_pretrained(directory)
    size = vision["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    image_processor.save_pretrained(directory)   # preprocessor_config.json, as hub checkpoints have it
    return directory


def make_tiny_siglip(directory: str | Path, *, seed: int = 0, full_size: bool = False) -> Path:
    """SiglipModel (fixed-resolution SigLIP2 layout) + SigLIP2 tokenizer + SiglipImageProcessor settings."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    directory = Path(directory)
    tokenizer = _siglip2_tokenizer(SIGLIP_TEXT_LENGTH)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if full_size:   # siglip2-base-patch32-256
        text = dict(vocab_size=256000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=SIGLIP_TEXT_LENGTH, **ids)
        vision = dict(image_size=256, patch_size=32, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12)
    else:
        text = dict(vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=SIGLIP_TEXT_LENGTH, **ids)
        vision = dict(image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, hidden_size=TINY_HIDDEN,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = SiglipConfig(text_config=text, vision_config=vision)
    _seeded(seed)
    SiglipModel(config).eval().save_pretrained(directory)
    size = vision["image_size"]
    image_processor = SiglipImageProcessor(
        size={"height": size, "width": size}, resample=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return directory


def make_tiny_sentence_encoder(directory: str | Path, arch: str = "bert", *, seed: int = 0,
                               full_size: bool = False) -> Path:
    """A sentence-transformers checkpoint (Transformer + mean Pooling) with a tokenizer trained on multilingual text.

    arch "bert": BertModel + multilingual WordPiece (full size: paraphrase-multilingual-MiniLM-L12-v2 shape, vocab 250037).
    arch "xlm-roberta": XLMRobertaModel + Unigram (full size: the same 12 x 384 shape with the XLM-R vocabulary, 250002).
    """
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    directory = Path(directory)
    if arch == "bert":
        tokenizer = _bert_tokenizer(SENTENCE_MAX_SEQ_LENGTH)
        config_cls, model_cls, full_vocab, positions = BertConfig, BertModel, 250037, 512
    elif arch == "xlm-roberta":
        tokenizer = _xlmr_tokenizer(SENTENCE_MAX_SEQ_LENGTH)
        # RoBERTa positions start after the padding index, hence the +2.
        config_cls, model_cls, full_vocab, positions = XLMRobertaConfig, XLMRobertaModel, 250002, 514
    else:
        raise ValueError(f"arch must be 'bert' or 'xlm-roberta', not {arch!r}")
    shape = (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12,
                  vocab_size=full_vocab, max_position_embeddings=positions)
             if full_size else
             dict(hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=len(tokenizer), max_position_embeddings=positions))
    config = config_cls(pad_token_id=tokenizer.pad_token_id, **shape)
    _seeded(seed)
    model_cls(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _write_sentence_transformers_files(directory, shape["hidden_size"])
    return directory


def _write_sentence_transformers_files(directory: Path, hidden_size: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (directory / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": SENTENCE_MAX_SEQ_LENGTH, "do_lower_case": False}, indent=2), encoding="utf-8")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2), encoding="utf-8")
