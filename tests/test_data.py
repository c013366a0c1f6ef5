"""Data loading: every source type, column mapping, eval splits, every stage format, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rlhf_dist.config.sections import DataSection
from rlhf_dist.data import check_preference, load_splits, looks_local, prepare, split_prompt
from rlhf_dist.errors import DataError, UserError

USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "It is 4."}
WRONG = {"role": "assistant", "content": "It is 5."}
SYSTEM = {"role": "system", "content": "Be brief."}
SKIP = ", or set stage.data.on_bad_row=skip to drop them (counted in metrics.json)"


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(kind: str, path, **kw):
    """load_splits with no held-out data unless asked; returns (train rows, eval rows or None, source)."""
    kw.setdefault("eval_fraction", 0.0)
    train, evaluation, source = load_splits(DataSection(path=str(path), **kw), kind, "stage")
    return train.to_list(), (evaluation.to_list() if evaluation is not None else None), source


def data_error(kind: str, path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load(kind, path, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)


# ----------------------------------------------------------------------------------------------
# 1. Source types
# ----------------------------------------------------------------------------------------------
def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha"}, {"text": "beta"}, {"text": "gamma"}])
    train, evaluation, source = load("pretrain", path)
    assert train == [{"text": "alpha"}, {"text": "beta"}, {"text": "gamma"}]
    assert evaluation is None and source == str(path)


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p1", "completion": " c1"}, {"prompt": "p2", "completion": " c2"}]))
    train, _, _ = load("sft", path)
    assert train == [{"prompt": "p1", "completion": " c1"}, {"prompt": "p2", "completion": " c2"}]


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["prompt", "chosen", "rejected"], ["Q1?", " yes", " no"], ["Q2, with comma?", " a", " b"]])
    train, _, _ = load("preference", path)
    assert train == [{"prompt": "Q1?", "chosen": " yes", "rejected": " no"},
                     {"prompt": "Q2, with comma?", "chosen": " a", "rejected": " b"}]


def test_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["p1", "p2", "p3"]}).to_parquet(path)
    train, _, _ = load("prompts", path)
    assert train == [{"prompt": "p1"}, {"prompt": "p2"}, {"prompt": "p3"}]


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("First paragraph,\nstill the first.\n\nSecond paragraph.\n\n\n\nThird.")
    train, _, _ = load("pretrain", path)
    assert train == [{"text": "First paragraph,\nstill the first."}, {"text": "Second paragraph."},
                     {"text": "Third."}]


def test_txt_trailing_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n\n\n")
    train, _, _ = load("pretrain", path)
    assert [row["text"].strip() for row in train] == ["First paragraph.", "Second paragraph."]


def test_local_dataset_folder_with_eval_split(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"train {i}"} for i in range(5)])
    write_jsonl(folder / "test.jsonl", [{"text": f"test {i}"} for i in range(2)])
    train, evaluation, source = load("pretrain", folder, eval_split="test")
    assert train == [{"text": f"train {i}"} for i in range(5)]
    assert evaluation == [{"text": "test 0"}, {"text": "test 1"}]
    assert source == str(folder)


def test_eval_split_rows_are_numbered_in_their_own_source(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(folder / "test.jsonl", [{"text": "c"}, {"text": " "}])
    msg = data_error("pretrain", folder, eval_split="test")
    assert msg == f"{folder} [test] row 2: field 'text' is empty; fix or remove the row" + SKIP


def test_separate_eval_path(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": "z"}])
    train, evaluation, _ = load("pretrain", train_file, eval_path=str(eval_file), eval_fraction=0.5)
    assert train == [{"text": "a"}, {"text": "b"}, {"text": "c"}]  # eval_fraction is not used
    assert evaluation == [{"text": "z"}]


def test_eval_split_on_a_single_file_does_not_reuse_training_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    try:
        train, evaluation, _ = load("pretrain", path, eval_split="test")
    except DataError as exc:
        assert "test" in str(exc)
        return
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}


# ----------------------------------------------------------------------------------------------
# 2. Column mapping
# ----------------------------------------------------------------------------------------------
def test_columns_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q1", "answer": " A1", "id": 1},
                                               {"question": "Q2", "answer": " A2", "id": 2}])
    train, _, _ = load("sft", path, columns={"prompt": "question", "completion": "answer"})
    assert train == [{"prompt": "Q1", "completion": " A1"}, {"prompt": "Q2", "completion": " A2"}]


def test_columns_mapping_replaces_an_existing_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "old", "completion": " old", "question": "Q", "answer": " A"}])
    train, _, _ = load("sft", path, columns={"prompt": "question", "completion": "answer"})
    assert train == [{"prompt": "Q", "completion": " A"}]


def test_columns_mapping_to_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q1", "answer": " A1"}])
    msg = data_error("sft", path, columns={"prompt": "questoin", "completion": "answer"})
    assert msg == (f"{path}: column 'questoin' (mapped to 'prompt' in data.columns) not found; "
                   "columns are: answer, question")


# ----------------------------------------------------------------------------------------------
# 3. Held-out data and sample limits
# ----------------------------------------------------------------------------------------------
def ten_rows(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "ten.jsonl", [{"text": f"t{i}"} for i in range(10)])


def test_eval_fraction(tmp_path):
    path = ten_rows(tmp_path)
    train, evaluation, _ = load("pretrain", path, eval_fraction=0.2, seed=0)
    assert (len(train), len(evaluation)) == (8, 2)
    texts_train, texts_eval = {r["text"] for r in train}, {r["text"] for r in evaluation}
    assert not texts_train & texts_eval
    assert texts_train | texts_eval == {f"t{i}" for i in range(10)}
    again = load("pretrain", path, eval_fraction=0.2, seed=0)
    assert again[0] == train and again[1] == evaluation  # the seed makes the split reproducible


def test_max_samples(tmp_path):
    path = ten_rows(tmp_path)
    train, evaluation, _ = load("pretrain", path, eval_fraction=0.2, max_samples=3, max_eval_samples=1)
    assert (len(train), len(evaluation)) == (3, 1)
    train, evaluation, _ = load("pretrain", path, eval_fraction=0.2, max_samples=100, max_eval_samples=100)
    assert (len(train), len(evaluation)) == (8, 2)
    train, evaluation, _ = load("pretrain", path, max_samples=4)
    assert train == [{"text": f"t{i}"} for i in range(4)] and evaluation is None


def test_eval_fraction_needs_two_rows(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "only"}])
    assert data_error("pretrain", path, eval_fraction=0.1) == (
        f"{path}: only 1 usable row(s); need at least 2 to hold out eval data")


def test_path_not_set():
    with pytest.raises(DataError) as info:
        load_splits(DataSection(), "sft", "sft")
    assert str(info.value) == "sft.data.path is not set; give a hub dataset id or a local file"


# ----------------------------------------------------------------------------------------------
# 4. SFT formats
# ----------------------------------------------------------------------------------------------
def test_sft_text(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    assert load("sft", path)[0] == [{"text": "one"}, {"text": "two"}]


def test_sft_prompt_completion_strings(demo_data):
    train, _, _ = load("sft", demo_data["sft"])
    lines = [json.loads(line) for line in Path(demo_data["sft"]).read_text().splitlines()]
    assert len(train) == len(lines) == 320
    assert train[0] == lines[0] and train[-1] == lines[-1]
    assert train[0]["prompt"].startswith("Question: ") and train[0]["prompt"].endswith("\nAnswer:")


def test_sft_prompt_completion_messages(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}])
    assert load("sft", path)[0] == [{"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}]


def test_sft_messages_become_prompt_and_completion(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [USER, ASSISTANT]},
        {"messages": [SYSTEM, USER, WRONG, {"role": "user", "content": "Sure?"}, ASSISTANT]},
    ])
    train, _, _ = load("sft", path)
    assert train == [
        {"prompt": [USER], "completion": [ASSISTANT]},
        {"prompt": [SYSTEM, USER, WRONG, {"role": "user", "content": "Sure?"}], "completion": [ASSISTANT]},
    ]


def test_sft_messages_must_end_with_assistant(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [USER, ASSISTANT]}, {"messages": [USER, ASSISTANT]},
                                              {"messages": [SYSTEM, USER]}])
    assert data_error("sft", path) == (
        f"{path} line 3: field 'messages' should end with an assistant message after at least one other; "
        "fix or remove the row" + SKIP)


def test_sft_messages_need_more_than_the_answer(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [ASSISTANT]}])
    assert f"{path} line 1: field 'messages' should end with an assistant message" in data_error("sft", path)


def test_sft_bad_message(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [USER, ASSISTANT]},
                                              {"messages": [{"role": "user"}, ASSISTANT]}])
    assert data_error("sft", path) == (
        f"{path} line 2: field 'messages[0]' should be a message {{role: str, content: str}}; fix or remove the row" + SKIP)


def test_sft_empty_message_content(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [USER, {"role": "assistant", "content": "  "}]}])
    assert data_error("sft", path) == f"{path} line 1: field 'messages[1].content' is empty; fix or remove the row" + SKIP


def test_sft_prompt_string_completion_messages(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Q", "completion": [ASSISTANT]}])
    assert data_error("sft", path) == (
        f"{path} line 1: field 'completion' must be a string when prompt is a string (messages with messages); "
        "fix or remove the row" + SKIP)


def test_sft_prompt_without_completion_column(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Q"}])
    assert data_error("sft", path) == (
        f"{path}: no 'completion' column for SFT prompt/completion data (columns are: prompt); rename it or map "
        "yours with data.columns, e.g. {completion: your_column}")


def test_sft_no_known_columns(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "Q", "answer": "A"}])
    msg = data_error("sft", path)
    assert msg.startswith(f"{path}: no SFT columns (need 'text', 'prompt'+'completion', 'messages', or 'chosen'+'rejected'")
    assert "columns are: question, answer" in msg and msg.endswith("map yours with data.columns")


# ----------------------------------------------------------------------------------------------
# 5. Preference formats
# ----------------------------------------------------------------------------------------------
def test_preference_explicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:", "chosen": " good", "rejected": " bad", "extra": 1}])
    assert load("preference", path)[0] == [{"prompt": "Q:", "chosen": " good", "rejected": " bad"}]


def test_preference_implicit_prompt_cut_at_whitespace(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "The sky is blue today.", "rejected": "The sky is bluish."}])
    assert load("preference", path)[0] == [{"prompt": "The sky is ", "chosen": "blue today.", "rejected": "bluish."}]


def test_preference_hh_single_turn(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5.",
    }])
    (row,) = load("preference", path)[0]
    assert row["prompt"] == "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert row["prompt"].endswith("\n\nAssistant:")
    assert row["chosen"] == " It is 4." and row["rejected"] == " It is 5."


def test_preference_hh_multi_turn_splits_after_last_shared_assistant(tmp_path):
    history = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2+2?\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": history + " It is 4.", "rejected": history + " Five."}])
    (row,) = load("preference", path)[0]
    assert row == {"prompt": history, "chosen": " It is 4.", "rejected": " Five."}


def test_preference_hh_answers_sharing_words(tmp_path):
    # The common prefix runs into the answers ("It is"); the cut is still right after "Assistant:".
    history = "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert split_prompt(history + " It is 4, surely.", history + " It is 5.") == (
        history, " It is 4, surely.", " It is 5.")


def test_preference_messages_implicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"chosen": [SYSTEM, USER, ASSISTANT], "rejected": [SYSTEM, USER, WRONG]}])
    assert load("preference", path)[0] == [{"prompt": [SYSTEM, USER], "chosen": [ASSISTANT], "rejected": [WRONG]}]


def test_preference_messages_explicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [WRONG]}])
    assert load("preference", path)[0] == [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [WRONG]}]


def test_preference_demo_file(demo_data):
    lines = [json.loads(line) for line in Path(demo_data["preference"]).read_text().splitlines()]
    train, evaluation, _ = load("preference", demo_data["preference"])
    assert len(train) == 320 and evaluation is None
    assert train[0] == lines[0] and train[-1] == lines[-1]
    assert set(train[0]) == {"prompt", "chosen", "rejected"}
    train, evaluation, _ = load("preference", demo_data["preference"], eval_fraction=0.1, seed=0)
    assert (len(train), len(evaluation)) == (288, 32)


def test_preference_no_shared_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "abc", "rejected": "abd"}])
    assert data_error("preference", path) == (
        f"{path} line 1: field 'chosen' shares no prompt with 'rejected'; add a 'prompt' column; fix or remove the row" + SKIP)


def test_preference_identical_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT]}])
    assert data_error("preference", path) == (
        f"{path} line 1: field 'chosen' equals 'rejected': the pair prefers nothing (a DPO or reward loss learns nothing "
        "from it); fix or remove the row" + SKIP)


def test_preference_rows_mixing_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                              {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [WRONG]}])
    assert data_error("preference", path) == (
        f"{path} line 2: field 'prompt' is a message list, but in line 1 (the first good row) it holds strings; use one "
        "type per column; fix or remove the row" + SKIP)


def test_check_preference_direct():
    import datasets

    ds = datasets.Dataset.from_list([{"chosen": "x y", "rejected": "x z"}])
    assert check_preference(ds, "src", DataSection()) == ([{"prompt": "x ", "chosen": "y", "rejected": "z"}], [])
    prepared = prepare(ds, DataSection(), "preference", "src")
    assert prepared.column_names == ["prompt", "chosen", "rejected"] and prepared[0]["prompt"] == "x "


# ----------------------------------------------------------------------------------------------
# 6. Prompts
# ----------------------------------------------------------------------------------------------
def test_prompts_strings(demo_data):
    train, _, _ = load("prompts", demo_data["prompts"])
    assert len(train) == 32
    assert all(set(r) == {"prompt"} and r["prompt"].startswith("Question: ") for r in train)


def test_prompts_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [USER]}, {"prompt": [SYSTEM, USER]}])
    assert load("prompts", path)[0] == [{"prompt": [USER]}, {"prompt": [SYSTEM, USER]}]


def test_prompts_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Q"}])
    assert data_error("prompts", path) == (
        f"{path}: no 'prompt' column for prompts (columns are: question); rename it or map yours with "
        "data.columns, e.g. {prompt: your_column}")


@pytest.mark.parametrize("kind, rows", [
    ("prompts", [{"prompt": "Q"}, {"prompt": [USER]}]),
    ("sft", [{"prompt": "Q", "completion": " A"}, {"prompt": [USER], "completion": [ASSISTANT]}]),
])
def test_rows_mixing_strings_and_messages_give_data_error(tmp_path, kind, rows):
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    msg = data_error(kind, path)
    assert f"{path} line 2: field 'prompt'" in msg


# ----------------------------------------------------------------------------------------------
# 7. Bad input: one line naming file, row (from 1) and field
# ----------------------------------------------------------------------------------------------
def test_preference_row_without_chosen(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": " a", "rejected": " b"},
        {"prompt": "Q", "chosen": " a", "rejected": " b"},
        {"prompt": "Q", "rejected": " b"},
    ])
    assert data_error("preference", path) == f"{path} line 3: field 'chosen' is missing; fix or remove the row" + SKIP


def test_preference_chosen_null(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"},
                                              {"prompt": "Q", "chosen": None, "rejected": " b"}])
    assert f"{path} line 2: field 'chosen' is missing" in data_error("preference", path)


def test_preference_without_chosen_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "good": " a", "rejected": " b"}])
    msg = data_error("preference", path)
    assert msg == (f"{path}: no 'chosen' column for preference pairs (columns are: prompt, good, rejected); "
                   "rename it or map yours with data.columns, e.g. {chosen: your_column}")


def test_preference_chosen_column_mapped(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "good": " a", "rejected": " b"}])
    assert load("preference", path, columns={"chosen": "good"})[0] == [{"prompt": "Q", "chosen": " a", "rejected": " b"}]


def test_pretrain_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": "   \n"}])
    assert data_error("pretrain", path) == f"{path} line 2: field 'text' is empty; fix or remove the row" + SKIP


def test_pretrain_missing_text_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"content": "x"}])
    assert data_error("pretrain", path).startswith(f"{path}: no 'text' column for pretraining (columns are: content)")


def test_non_string_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"},
                                              {"prompt": "Q", "chosen": 5, "rejected": " b"}])
    assert data_error("preference", path) == (
        f"{path} line 2: field 'chosen' should be a string, got int; fix or remove the row" + SKIP)


def test_chosen_string_rejected_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": [WRONG]}])
    assert data_error("preference", path) == (
        f"{path} line 1: field 'rejected' must have the same type as 'chosen' (both strings or both messages); "
        "fix or remove the row" + SKIP)


def test_missing_data_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert data_error("sft", path) == (
        f"stage.data.path: data file not found: {path}; fix the path (or give a hub dataset id)")


def test_missing_eval_file(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    missing = tmp_path / "eval.jsonl"
    assert data_error("pretrain", path, eval_path=str(missing)) == (
        f"stage.data.eval_path: data file not found: {missing}; fix the path (or give a hub dataset id)")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<rows/>")
    assert data_error("sft", path) == (
        f"stage.data.path: {path} has an unsupported extension; use one of .jsonl, .json, .parquet, .csv, .txt (each also as "
        ".gz/.bz2/.xz/.zst)")


# ----------------------------------------------------------------------------------------------
# 8. looks_local
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, local", [
    ("org/name", False),
    ("name", False),
    ("./x", True),
    ("../x", True),
    ("/abs", True),
    ("~/data", True),
    ("a/b/c", True),
    ("file.jsonl", True),
    ("data.PARQUET", True),
])
def test_looks_local(path, local):
    assert looks_local(path) is local


def test_string_prompt_with_message_answers_that_repeat_it(tmp_path):
    """UltraFeedback's layout: prompt is a string, chosen/rejected are whole chats starting with it."""
    path = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "What is 2+2?", "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]},
    ])
    train, _, _ = load("preference", path)
    assert train == [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [WRONG]}]
    other = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Something else", "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]},
    ])
    assert data_error("preference", other).startswith(f"{other} line 1: field 'prompt' is a string but")


def test_skip_empty_drops_blank_pretraining_texts(tmp_path):
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"text": "A line."}, {"text": ""}, {"text": "  "}, {"text": "B."}])
    assert "line 2: field 'text' is empty" in data_error("pretrain", path)
    train, _, _ = load("pretrain", path, skip_empty=True)
    assert train == [{"text": "A line."}, {"text": "B."}]
