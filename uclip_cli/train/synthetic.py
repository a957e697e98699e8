"""A synthetic world with a known meaning space, to show that the trained heads do what uCLIP promises.

Generative story (all random choices from `WorldConfig.seed`):

* Meanings. `n_topics` topic centres c_t ~ N(0, I/d) in a d_latent-dim latent space (norm ~ 1);
  a meaning is z = c_t + topic_spread * N(0, I/d). Meanings of one topic are near each other.
* Items. One photo or one caption of meaning z has content u = z + item_detail * N(0, I/d):
  two photos of the same thing differ, and a caption never says everything a photo shows.
* CLIP-like space (d_v): image = nrm(A u + o_img + clip_noise * N(0, I/d_v))
                           English CLIP text = nrm((A + clip_text_mismatch * G) u + o_txt + noise)
  o_img and o_txt are independent random vectors of norm `modality_gap`: image and text vectors
  live in two offset cones, as in real CLIP (the modality gap). G ~ N(0, 1/d) entrywise.
* Multilingual space (d_m): text in language l = nrm(D_l B u + s_l + multi_noise * N(0, I/d_m)),
  D_en = I, s_en = 0; for every other language D_l = I + language_distortion * G_l (a random
  linear mix, ||(D_l - I) x|| ~ language_distortion * ||x||) and s_l a random shift of norm
  `language_shift`. A map fitted on English inputs alone therefore transfers imperfectly.

Data (unpaired, as the method requires; meanings are numbered, and each row records its meaning):

* anchors: n_anchors English captions, each encoded by both towers -> (anchor_clip, anchor_multi)
  (the only pairing the method uses: the same sentence through two encoders);
* image memory: one photo for each of n_image_memory meanings (no caption);
* foreign-text memory: n_foreign_memory meanings, one caption each, translated into every
  language of `languages` (same content u, rendered per language; correspondence never used);
* memory meanings are fresh (not anchor meanings) unless `memory_overlap` > 0, the share of each
  memory's meanings drawn from the anchor meanings (a new photo / a new caption of that meaning);
  with `translated_memory`, a foreign-memory caption of an anchor meaning is a translation of that
  anchor caption itself (same content u), as in a machine-translated copy of the caption corpus;
* test: n_test held-out meanings, each with one photo and one native caption per language
  (independent content per language, like XM3600), plus English;
* oracle pairs: true (photo, foreign caption) pairs of the anchor meanings in every language,
  used only to train the oracle reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


class WorldConfigError(ValueError):
    """A synthetic-world setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    # meaning space
    d_latent: int = 32
    n_topics: int = 16
    topic_spread: float = 0.7         # meanings around their topic centre (centres have norm ~1)
    item_detail: float = 0.6          # what one photo / caption adds to or leaves out of its meaning
    # CLIP-like space
    d_v: int = 64
    modality_gap: float = 1.2         # norm of each modality's offset (image, English text)
    clip_text_mismatch: float = 0.2   # text tower's own linear deviation from the image tower's map
    clip_noise: float = 0.2           # per-item encoder noise (norm)
    # multilingual space
    d_m: int = 48
    languages: tuple[str, ...] = ("cs", "fi", "hr", "hu", "ro")
    language_shift: float = 0.5       # norm of each foreign language's offset
    language_distortion: float = 0.5  # strength of each foreign language's linear mix
    multi_noise: float = 0.2          # per-item encoder noise (norm)
    # sizes
    n_anchors: int = 4000
    n_image_memory: int = 4000
    n_foreign_memory: int = 1000      # meanings; the memory holds one caption per meaning per language
    n_test: int = 500
    memory_overlap: float = 0.0       # share of memory meanings taken from the anchor meanings
    translated_memory: bool = False   # foreign captions of anchor meanings translate the anchor caption

    def validate(self) -> "WorldConfig":
        for name in ("d_latent", "n_topics", "d_v", "d_m", "n_anchors", "n_image_memory", "n_foreign_memory", "n_test"):
            if getattr(self, name) < 1:
                raise WorldConfigError(f"world setting {name}={getattr(self, name)!r} must be >= 1")
        for name in ("topic_spread", "item_detail", "modality_gap", "clip_text_mismatch", "clip_noise",
                     "language_shift", "language_distortion", "multi_noise"):
            if getattr(self, name) < 0:
                raise WorldConfigError(f"world setting {name}={getattr(self, name)!r} must be >= 0")
        if not self.languages or "en" in self.languages or len(set(self.languages)) != len(self.languages):
            raise WorldConfigError(f"world setting languages={self.languages!r}: give distinct non-English codes")
        if not 0 <= self.memory_overlap <= 1:
            raise WorldConfigError(f"world setting memory_overlap={self.memory_overlap!r} must be in [0, 1]")
        if round(self.memory_overlap * max(self.n_image_memory, self.n_foreign_memory)) > self.n_anchors:
            raise WorldConfigError("world setting memory_overlap asks for more anchor meanings than n_anchors")
        return self


@dataclass(frozen=True)
class SyntheticData:
    """Everything generated from one WorldConfig; float32 rows are L2-normalised features."""

    config: WorldConfig
    anchor_clip: np.ndarray                 # [n_anchors, d_v]   English captions, CLIP text tower
    anchor_multi: np.ndarray                # [n_anchors, d_m]   the same captions, multilingual tower
    anchor_meanings: np.ndarray             # [n_anchors]
    image_memory: np.ndarray                # [n_image_memory, d_v]
    image_memory_meanings: np.ndarray
    foreign_memory: np.ndarray              # [n_foreign_memory * n_languages, d_m]
    foreign_memory_meanings: np.ndarray
    foreign_memory_languages: np.ndarray    # language code of each row
    test_images: np.ndarray                 # [n_test, d_v]
    test_captions: dict[str, np.ndarray]    # lang (every foreign language and "en") -> [n_test, d_m]
    test_meanings: np.ndarray
    oracle_images: np.ndarray               # [n_anchors * n_languages, d_v], paired row by row with
    oracle_captions: np.ndarray             # [n_anchors * n_languages, d_m]
    oracle_languages: np.ndarray
    meaning_latents: np.ndarray = field(repr=False)   # [n_meanings, d_latent], z of every meaning id
    meaning_topics: np.ndarray = field(repr=False)    # topic of every meaning id


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...], scale: float, dim: int) -> np.ndarray:
    """N(0, scale^2 / dim) entries: a row of length dim has norm ~ scale."""
    return rng.standard_normal(shape) * (scale / np.sqrt(dim))


def _random_vector(rng: np.random.Generator, dim: int, norm: float) -> np.ndarray:
    v = rng.standard_normal(dim)
    return norm * v / np.linalg.norm(v)


class World:
    """The fixed parts of a world: topic centres, encoder maps, modality and language offsets."""

    def __init__(self, config: WorldConfig):
        self.config = c = config.validate()
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, 0]))
        d = c.d_latent
        self.topic_centres = _gaussian(rng, (c.n_topics, d), 1.0, d)
        self.image_map = _gaussian(rng, (c.d_v, d), 1.0, d)
        self.text_map = self.image_map + _gaussian(rng, (c.d_v, d), c.clip_text_mismatch, d)
        self.image_offset = _random_vector(rng, c.d_v, c.modality_gap)
        self.text_offset = _random_vector(rng, c.d_v, c.modality_gap)
        self.multi_map = _gaussian(rng, (c.d_m, d), 1.0, d)
        self.language_mix = {"en": np.eye(c.d_m)}
        self.language_offset = {"en": np.zeros(c.d_m)}
        for lang in c.languages:
            self.language_mix[lang] = np.eye(c.d_m) + _gaussian(rng, (c.d_m, c.d_m), c.language_distortion, c.d_m)
            self.language_offset[lang] = _random_vector(rng, c.d_m, c.language_shift)

    def meanings(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n meanings: (latent vectors [n, d_latent], topic of each)."""
        topics = rng.integers(0, self.config.n_topics, size=n)
        z = self.topic_centres[topics] + _gaussian(rng, (n, self.config.d_latent), self.config.topic_spread, self.config.d_latent)
        return z, topics

    def contents(self, rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
        """One item (photo or caption) per meaning row."""
        return z + _gaussian(rng, z.shape, self.config.item_detail, self.config.d_latent)

    def images(self, rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
        c = self.config
        return _normalise(u @ self.image_map.T + self.image_offset + _gaussian(rng, (len(u), c.d_v), c.clip_noise, c.d_v))

    def clip_texts(self, rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
        c = self.config
        return _normalise(u @ self.text_map.T + self.text_offset + _gaussian(rng, (len(u), c.d_v), c.clip_noise, c.d_v))

    def multilingual(self, rng: np.random.Generator, u: np.ndarray, lang: str) -> np.ndarray:
        c = self.config
        clean = u @ self.multi_map.T @ self.language_mix[lang].T + self.language_offset[lang]
        return _normalise(clean + _gaussian(rng, (len(u), c.d_m), c.multi_noise, c.d_m))


def _meaning_ids(c: WorldConfig, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """Meaning ids of each data part; fresh ids are consecutive, overlap ids come from the anchors."""
    next_id = 0

    def fresh(n: int) -> np.ndarray:
        nonlocal next_id
        ids = np.arange(next_id, next_id + n)
        next_id += n
        return ids

    anchors = fresh(c.n_anchors)

    def memory(n: int) -> np.ndarray:
        shared = int(round(c.memory_overlap * n))
        return np.concatenate([rng.choice(anchors, size=shared, replace=False), fresh(n - shared)])

    ids = {"anchors": anchors, "image_memory": memory(c.n_image_memory), "foreign_memory": memory(c.n_foreign_memory)}
    ids["test"] = fresh(c.n_test)
    return ids, next_id


def generate_world(config: WorldConfig = WorldConfig()) -> SyntheticData:
    """All data of one world, deterministic under config.seed."""
    world = World(config)
    c = world.config
    rng = np.random.default_rng(np.random.SeedSequence([c.seed, 1]))
    ids, n_meanings = _meaning_ids(c, rng)
    z, topics = world.meanings(rng, n_meanings)

    anchor_u = world.contents(rng, z[ids["anchors"]])
    foreign_u = world.contents(rng, z[ids["foreign_memory"]])   # one caption, translated into every language
    if c.translated_memory:
        of_anchor = ids["foreign_memory"] < c.n_anchors          # anchor meaning ids are 0 .. n_anchors - 1
        foreign_u[of_anchor] = anchor_u[ids["foreign_memory"][of_anchor]]
    foreign = [world.multilingual(rng, foreign_u, lang) for lang in c.languages]
    test_z = z[ids["test"]]
    oracle_z = np.concatenate([z[ids["anchors"]]] * len(c.languages))
    oracle_langs = np.repeat(np.array(c.languages), c.n_anchors)
    return SyntheticData(
        config=c,
        anchor_clip=world.clip_texts(rng, anchor_u),
        anchor_multi=world.multilingual(rng, anchor_u, "en"),
        anchor_meanings=ids["anchors"],
        image_memory=world.images(rng, world.contents(rng, z[ids["image_memory"]])),
        image_memory_meanings=ids["image_memory"],
        foreign_memory=np.concatenate(foreign),
        foreign_memory_meanings=np.tile(ids["foreign_memory"], len(c.languages)),
        foreign_memory_languages=np.repeat(np.array(c.languages), c.n_foreign_memory),
        test_images=world.images(rng, world.contents(rng, test_z)),
        test_captions={lang: world.multilingual(rng, world.contents(rng, test_z), lang) for lang in ("en", *c.languages)},
        test_meanings=ids["test"],
        oracle_images=world.images(rng, world.contents(rng, oracle_z)),
        oracle_captions=np.concatenate([
            world.multilingual(rng, world.contents(rng, oracle_z[oracle_langs == lang]), lang) for lang in c.languages
        ]),
        oracle_languages=oracle_langs,
        meaning_latents=z,
        meaning_topics=topics,
    )


def _soft_weights(queries: np.ndarray, memory: np.ndarray, tau: float) -> np.ndarray:
    logits = queries @ memory.T / tau
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def pseudo_pair_quality(data: SyntheticData, tau: float = 0.01, n_queries: int = 2000) -> dict[str, float]:
    """How well the soft-retrieval pseudo pairs (k, v) of the anchors agree in meaning (diagnostic).

    *_hit: share of anchors whose heaviest memory row has the anchor's own meaning;
    pair_same_meaning / pair_same_topic: heaviest image row and heaviest foreign row agree;
    pair_latent_cosine: cosine of the softmax-weighted latent meanings behind v and k;
    test_nearest_cosine: mean latent cosine of a held-out meaning to its nearest other held-out
    meaning, the granularity that R@1 on the test set asks for; *_neighbours: effective number
    of memory rows in each soft target (1 / sum of squared weights).
    """
    unit = data.meaning_latents / np.linalg.norm(data.meaning_latents, axis=1, keepdims=True)
    anchors = data.anchor_meanings[:n_queries]
    w_v = _soft_weights(data.anchor_clip[:n_queries], data.image_memory, tau)
    w_k = _soft_weights(data.anchor_multi[:n_queries], data.foreign_memory, tau)
    top_v = data.image_memory_meanings[w_v.argmax(axis=1)]
    top_k = data.foreign_memory_meanings[w_k.argmax(axis=1)]
    z_v, z_k = w_v @ unit[data.image_memory_meanings], w_k @ unit[data.foreign_memory_meanings]
    test = unit[data.test_meanings] @ unit[data.test_meanings].T
    np.fill_diagonal(test, -np.inf)
    return {
        "image_hit": float(np.mean(top_v == anchors)),
        "foreign_hit": float(np.mean(top_k == anchors)),
        "pair_same_meaning": float(np.mean(top_v == top_k)),
        "pair_same_topic": float(np.mean(data.meaning_topics[top_v] == data.meaning_topics[top_k])),
        "pair_latent_cosine": float(np.mean(np.sum(z_v * z_k, axis=1) / np.linalg.norm(z_v, axis=1) / np.linalg.norm(z_k, axis=1))),
        "test_nearest_cosine": float(np.mean(test.max(axis=1))),
        "image_neighbours": float(np.mean(1 / np.sum(w_v ** 2, axis=1))),
        "foreign_neighbours": float(np.mean(1 / np.sum(w_k ** 2, axis=1))),
    }


def small_world(**overrides) -> WorldConfig:
    """A tiny world for tests: trains in about a second."""
    base = WorldConfig(n_anchors=1024, n_image_memory=1024, n_foreign_memory=256, n_test=200, languages=("cs", "fi"))
    return replace(base, **overrides)


# ---------------------------------------------------------------- training and evaluation on a world
# (PyTorch from here on; the generator above needs numpy only)

UNTRAINED = "untrained"
FULL = "full"
ORACLE = "oracle"
ABLATIONS = {
    "no L_text": {"use_text": False},
    "no L_pseudo": {"use_pseudo": False},
    "no L_intra": {"use_intra": False},
    "no perturbation": {"use_noise": False},
}
# beyond the paper (issue 13): the full method plus one option, or all of them (train/head_setup.py)
OPTIONS = {
    "+ language subspace removed": {"language_projection": True},
    "+ per-language retrieval": {"retrieval_per_language": True},
    "+ ridge start": {"init": "ridge"},
    "+ subspace removed + ridge": {"language_projection": True, "init": "ridge"},
    "+ all three": {"language_projection": True, "retrieval_per_language": True, "init": "ridge"},
    "+ subspace removed + ridge to multilingual": {"language_projection": True, "init": "ridge-to-multilingual"},
    "+ subspace removed + ridge to multilingual, Head_A frozen": {
        "language_projection": True, "init": "ridge-to-multilingual", "freeze_head_a": True},
    "+ subspace removed + ridge to multilingual, Head_A frozen, lr 1e-4": {
        "language_projection": True, "init": "ridge-to-multilingual", "freeze_head_a": True, "lr": 1e-4},
    "+ modality subspace removed": {"modality_projection": True},
    "+ both subspaces removed + ridge to multilingual, Head_A frozen, lr 1e-4": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual",
        "freeze_head_a": True, "lr": 1e-4},
    "+ both subspaces removed + ridge to multilingual, kernel Head_B, Head_A frozen, lr 1e-4": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual",
        "freeze_head_a": True, "head_b": "kernel", "lr": 1e-4},
    "+ both subspaces removed + ridge to multilingual, closed form only": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual", "refine": False},
    "+ both subspaces removed + ridge to multilingual, kernel Head_B, closed form only": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual", "head_b": "kernel",
        "refine": False},
    "+ language subspace removed + ridge to multilingual, kernel Head_B, closed form only": {
        "language_projection": True, "init": "ridge-to-multilingual", "head_b": "kernel", "refine": False},
}
# uclip train as it ships, on the synthetic world's sizing: every setting PAPER_START pins at TrainConfig's default
DEFAULT = "uclip train's default"
VARIANTS = (UNTRAINED, FULL, *ABLATIONS, *OPTIONS, DEFAULT, ORACLE)


def synthetic_train_config(seed: int = 0, **overrides):
    """The paper's training settings (its start and learning rate too: PAPER_START), sized for a synthetic
    world (CPU, seconds): batch 256 and 10 epochs instead of 512 and 5, which would be only 35 steps on
    4,000 anchors; no held-out split. The OPTIONS rows change the start from there."""
    from .config import PAPER_START, TrainConfig

    base = dict(PAPER_START, batch_size=256, epochs=10, seed=seed, device="cpu", heldout_fraction=0.0)
    return TrainConfig(**{**base, **overrides}).validate()


def train_variant(data: SyntheticData, variant: str, config):
    """Heads for one row of the benchmark, in eval mode.

    untrained: randomly initialised heads (seeded); full / ablations: the uCLIP trainer on the
    unpaired anchors and memories; oracle: the same heads and trainer with L_text alone on true
    (photo, foreign caption) pairs, i.e. SymNCE(Head_A(foreign caption), Head_B(photo)).
    """
    from dataclasses import replace as replace_config

    import torch

    from .data import TrainInputs, language_groups
    from .heads import UCLIPHeads
    from .trainer import train_heads

    if variant == UNTRAINED:
        torch.manual_seed(config.seed)
        return UCLIPHeads(data.config.d_m, data.config.d_v, config.d_shared, config.hidden_mult).eval()
    if variant == ORACLE:
        paired = replace_config(config, use_text=True, use_pseudo=False, use_intra=False)
        result = train_heads(TrainInputs(data.oracle_images, data.oracle_captions, data.image_memory,
                                         data.foreign_memory), paired)
    elif variant in (FULL, DEFAULT) or variant in ABLATIONS or variant in OPTIONS:
        from .config import PAPER_START, TrainConfig

        options = ({k: getattr(TrainConfig(), k) for k in PAPER_START} if variant == DEFAULT
                   else OPTIONS.get(variant, {}))
        ablated = replace_config(config, **ABLATIONS.get(variant, {}), **options)
        groups, labels = language_groups([(str(lang), 1) for lang in data.foreign_memory_languages])
        result = train_heads(TrainInputs(data.anchor_clip, data.anchor_multi, data.image_memory, data.foreign_memory,
                                         foreign_language=groups, foreign_languages=labels), ablated)
    else:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    return result.heads.eval()


def evaluate_heads(heads, data: SyntheticData, languages=None) -> dict:
    """Text->image and image->text Recall@1/5/10 on the held-out meanings, per language, and the
    average over the foreign languages."""
    import torch

    from uclip_cli.evaluate import retrieval_metrics

    languages = list(languages or data.config.languages)
    device = next(heads.parameters()).device
    project = lambda head, x: head(torch.from_numpy(x).to(device)).float().cpu().numpy()
    with torch.no_grad():
        images = project(heads.head_b, data.test_images)
        report = {lang: retrieval_metrics(images, project(heads.head_a, data.test_captions[lang]))
                  for lang in languages}
    foreign = [lang for lang in languages if lang != "en"]
    if foreign:
        report["average"] = {d: {m: float(np.mean([report[l][d][m] for l in foreign])) for m in report[foreign[0]][d]}
                             for d in ("t2i", "i2t")}
    return report
