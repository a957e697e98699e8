import json

import numpy as np
import pytest

from uclip_cli.evaluate import (
    EvaluationError,
    classification_metrics,
    evaluate_classification,
    evaluate_retrieval,
    format_report_table,
    load_captions,
    load_prompts,
    macro_f1,
    confusion_matrix,
    match_image_files,
    read_class_folder,
    recall_at_k,
    retrieval_metrics,
)

# ranks worked out by hand: q0 -> 0, q1 -> 3 (0.8, 0.7, 0.9 beat 0.2), q2 -> 1 (tie at 0.6 counts against it)
SIM = np.array([
    [0.9, 0.1, 0.5, 0.3],
    [0.8, 0.2, 0.7, 0.9],
    [0.1, 0.6, 0.4, 0.6],
])


def test_recall_at_k_matches_hand_computed_ranks():
    r = recall_at_k(SIM, [0, 1, 3], ks=(1, 2, 3, 4))
    assert r == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 200 / 3, "R@4": 100.0})


def test_recall_at_k_uses_best_of_several_correct_candidates():
    # q1 with correct {1, 2}: best correct 0.7, beaten by 0.8 and 0.9 -> rank 2
    r = recall_at_k(SIM, [0, [1, 2], 3], ks=(1, 2, 3))
    assert r == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def test_constant_scores_are_not_hits():
    assert recall_at_k(np.zeros((5, 5)), list(range(5)), ks=(1,))["R@1"] == 0.0


def test_recall_rejects_out_of_range_ground_truth():
    with pytest.raises(EvaluationError, match="outside"):
        recall_at_k(SIM, [0, 1, 4])


def test_retrieval_metrics_both_directions():
    images = np.eye(3)
    texts = np.array([[1.0, 0, 0], [1.0, 0.5, 0], [0, 0, 1.0]])
    # text 1 prefers image 0 (cos 0.89) over its own image 1 (cos 0.45); every image's best text is its own
    r = retrieval_metrics(images, texts, ks=(1, 2))
    assert r["t2i"] == pytest.approx({"R@1": 200 / 3, "R@2": 100.0})
    assert r["i2t"] == pytest.approx({"R@1": 100.0, "R@2": 100.0})


def test_macro_f1_matches_hand_computed_confusion():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2])
    # F1: class 0 = 2*2/(3+2) = 0.8, class 1 = 2*1/(2+2) = 0.5, class 2 = 2*1/(1+2) = 2/3
    expected = 100 * (0.8 + 0.5 + 2 / 3) / 3
    assert macro_f1(confusion_matrix(labels, predictions, 3)) == pytest.approx(expected)
    # a fourth class that is neither a label nor a prediction does not count
    assert macro_f1(confusion_matrix(labels, predictions, 4)) == pytest.approx(expected)
    # prompts as one-hot vectors; each image points at its predicted class
    m = classification_metrics(np.eye(4)[predictions], labels, np.eye(4))
    assert m == pytest.approx({"accuracy": 400 / 6, "macro_f1": expected})


def test_class_never_predicted_scores_zero():
    labels = np.array([0, 1])
    predictions = np.array([0, 0])
    # class 0: 2*1/(1+2) = 2/3; class 1: 0
    assert macro_f1(confusion_matrix(labels, predictions, 2)) == pytest.approx(100 / 3)


def _write_captions(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")


CAPTION_RECORDS = [
    {"image": "a.jpg", "captions": {"en": "a cat", "cs": "kočka", "fi": "kissa"}},
    {"image": "b.jpg", "captions": {"en": "a dog", "cs": "pes"}},                      # no fi
    {"image": "c.jpg", "captions": {"en": "a car", "cs": "", "fi": ["auto", "toinen"]}},  # empty cs, list fi
]


def test_load_captions_aligns_and_reports_missing(tmp_path):
    path = tmp_path / "captions.jsonl"
    _write_captions(path, CAPTION_RECORDS)
    caps = load_captions(path, ["cs", "fi"])
    assert caps.images == ["a.jpg", "b.jpg", "c.jpg"]
    assert caps.captions == {"cs": ["kočka", "pes", None], "fi": ["kissa", None, "auto"]}
    assert caps.missing("cs") == ["c.jpg"]
    assert caps.missing("fi") == ["b.jpg"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"image": "a.jpg", "captions": {"cs": "x"}}', "{not json"], r":2: not valid JSON"),
        (['{"captions": {"cs": "x"}}'], r":1: expected"),
        (['{"image": "a.jpg", "captions": {"cs": "x"}}'] * 2, r":2: image 'a.jpg' listed twice"),
        (['{"image": "a.jpg", "captions": {"de": "x"}}'], r"no captions in language\(s\) cs; available: de"),
    ],
)
def test_load_captions_rejects_bad_files(tmp_path, lines, message):
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match=message):
        load_captions(path, ["cs"])


def test_load_captions_missing_file(tmp_path):
    with pytest.raises(EvaluationError, match="captions file not found"):
        load_captions(tmp_path / "nope.jsonl", ["cs"])


def _lookup_encoder(table):
    def encode(texts, lang):
        return np.stack([table[t] for t in texts])
    return encode


def test_evaluate_retrieval_reports_missing_images_and_captions(tmp_path):
    path = tmp_path / "captions.jsonl"
    _write_captions(path, CAPTION_RECORDS + [{"image": "d.jpg", "captions": {"cs": "strom", "fi": "puu"}}])
    caps = load_captions(path, ["cs", "fi"])
    e = np.eye(4)
    features = {"a.jpg": e[0], "b.jpg": e[1], "c.jpg": e[2], "x.jpg": e[3]}  # d.jpg has no vector
    # cs: kočka finds a; pes (mostly like a) ranks its own image b second. fi: kissa finds a, auto finds c
    table = {"kočka": e[0], "pes": e[0] + 0.1 * e[1], "kissa": e[0], "auto": e[2], "strom": e[3], "puu": e[3]}
    report = evaluate_retrieval(features, caps, _lookup_encoder(table), ["cs", "fi"], ks=(1, 2))
    assert report["missing_images"] == ["d.jpg"] and report["n_missing_images"] == 1
    assert report["n_features_without_captions"] == 1
    cs, fi = report["languages"]["cs"], report["languages"]["fi"]
    assert (cs["n"], cs["missing_captions"], cs["n_missing_captions"]) == (2, ["c.jpg"], 1)
    assert (fi["n"], fi["missing_captions"]) == (2, ["b.jpg"])
    assert cs["t2i"] == pytest.approx({"R@1": 50.0, "R@2": 100.0})
    assert fi["t2i"] == pytest.approx({"R@1": 100.0, "R@2": 100.0})
    assert report["average"]["t2i"]["R@1"] == pytest.approx(75.0)
    table_text = format_report_table(report)
    assert "average" in table_text and "images without a vector: 1" in table_text
    json.dumps(report)  # the CLI prints it as JSON


def test_evaluate_retrieval_accepts_keys_and_array(tmp_path):
    path = tmp_path / "captions.jsonl"
    _write_captions(path, CAPTION_RECORDS)
    caps = load_captions(path, ["en"])
    e = np.eye(3)
    table = {"a cat": e[0], "a dog": e[1], "a car": e[2]}
    report = evaluate_retrieval((["a.jpg", "b.jpg", "c.jpg"], e), caps, _lookup_encoder(table))
    assert report["languages"]["en"]["t2i"]["R@1"] == 100.0


def test_prompt_file_and_classification(tmp_path):
    prompts_path = tmp_path / "prompts.tsv"
    prompts_path.write_text(
        "# lang\tclass\tprompt\n"
        "cs\tcat\tFotka kočky\ncs\tdog\tFotka psa\n\n"
        "fi\tcat\tKuva kissasta\nfi\tdog\tKuva koirasta\n",
        encoding="utf-8",
    )
    prompts = load_prompts(prompts_path)
    assert prompts == {"cs": {"cat": "Fotka kočky", "dog": "Fotka psa"}, "fi": {"cat": "Kuva kissasta", "dog": "Kuva koirasta"}}
    e = np.eye(2)
    table = {"Fotka kočky": e[0], "Fotka psa": e[1], "Kuva kissasta": e[1], "Kuva koirasta": e[0]}  # fi swapped
    images, labels = np.array([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), [0, 1, 0]
    report = evaluate_classification(images, labels, ["cat", "dog"], prompts, _lookup_encoder(table))
    assert report["languages"]["cs"]["accuracy"] == 100.0 and report["languages"]["cs"]["macro_f1"] == 100.0
    assert report["languages"]["fi"]["accuracy"] == 0.0
    assert report["average"]["accuracy"] == pytest.approx(50.0)
    assert "macro-F1" in format_report_table(report)
    with pytest.raises(EvaluationError, match="no prompt for class\\(es\\) bird"):
        evaluate_classification(images, labels, ["cat", "dog", "bird"], prompts, _lookup_encoder(table))


@pytest.mark.parametrize(
    "text, message",
    [("cs\tcat\n", ":1: expected"), ("cs\tcat\ta\ncs\tcat\tb\n", ":2: second prompt for class 'cat'")],
)
def test_prompt_file_errors(tmp_path, text, message):
    path = tmp_path / "prompts.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EvaluationError, match=message):
        load_prompts(path)


def test_read_class_folder(tmp_path):
    for rel in ["dog/1.jpg", "cat/a.png", "cat/sub/b.JPG", "cat/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "bird").mkdir()
    folder = read_class_folder(tmp_path)
    assert folder.class_names == ["bird", "cat", "dog"]
    assert [p.relative_to(tmp_path).as_posix() for p in folder.paths] == ["cat/a.png", "cat/sub/b.JPG", "dog/1.jpg"]
    assert folder.labels.tolist() == [1, 1, 2]
    assert folder.empty_classes == ["bird"]


def test_match_image_files(tmp_path):
    for rel in ["x/000411001ff7dd4f.jpg", "y/dup.jpg", "z/dup.jpg", "top.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found, missing = match_image_files(tmp_path, ["000411001ff7dd4f.jpg", "y/dup.jpg", "dup.jpg", "top", "gone.jpg"])
    assert {k: p.relative_to(tmp_path).as_posix() for k, p in found.items()} == {
        "000411001ff7dd4f.jpg": "x/000411001ff7dd4f.jpg",
        "y/dup.jpg": "y/dup.jpg",
        "top": "top.png",
    }
    assert missing == ["dup.jpg", "gone.jpg"]  # an ambiguous name is reported, not guessed
