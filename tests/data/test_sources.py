"""Training data from local files: formats, columns, and clear errors naming the file."""

import json

import pytest
from omegaconf import OmegaConf

from slmctl.config.compose import compose
from slmctl.data.sources import DataError, load_pairs, load_texts


def files_cfg(path, **extra):
    cfg = compose("pretrain", ["data=files", f"data.train={path}", *[f"data.{k}={v}" for k, v in extra.items()]])
    return cfg.data


def test_jsonl_pairs_and_held_out_validation(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(100)))
    cfg = files_cfg(path, **{"columns.source": "question", "columns.target": "answer", "validation_fraction": 0.1})
    train, validation = load_pairs(cfg, "train"), load_pairs(cfg, "validation")
    assert len(train) == 90 and len(validation) == 10
    assert not set(train) & set(validation)
    assert ("q3", "a3") in train + validation


def test_text_csv_and_txt(tmp_path):
    (tmp_path / "a.csv").write_text("text,other\nhello world,1\nsecond line,2\nthird,3\n")
    assert "hello world" in load_texts(files_cfg(tmp_path / "a.csv", validation=tmp_path / "a.csv"), "train")
    (tmp_path / "b.txt").write_text("one line\nanother line\n")
    assert load_texts(files_cfg(tmp_path / "b.txt", validation=tmp_path / "b.txt"), "validation") == ["one line", "another line"]


@pytest.mark.parametrize("content, name, message", [
    ('{"text": "fine"}\n{"text": broken\n', "bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ('{"body": "x"}\n{"body": "y"}\n{"body": "z"}\n', "cols.jsonl", "has no column 'text' (columns: body); set data.columns.text=NAME"),
    ("", "empty.txt", ""),
])
def test_bad_files_name_the_file(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_texts(files_cfg(path, validation=path), "train")
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_texts(files_cfg(tmp_path / "nope.jsonl"), "train")
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_texts(files_cfg(tmp_path / "data.xml"), "train")


def test_synthetic_settings_errors_are_data_errors():
    cfg = OmegaConf.merge(compose("pretrain", []).data, {"min_facts": 9, "max_facts": 2})
    with pytest.raises(DataError, match="min_facts"):
        load_pairs(cfg, "train")
