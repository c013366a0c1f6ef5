"""Data as it really comes: compressed files, malformed files, every bad row at once, semantic checks, chat roles,
HH-format data reused by every stage, and the length policy (rlhf_dist.readers, rlhf_dist.data, rlhf_dist.lengths).

Every failing file here is built by the test itself; each must give one line naming the file (and the line or row
where it is known), never a traceback."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path

import pytest

from rlhf_dist import lengths, registry
from rlhf_dist.config.sections import DataSection
from rlhf_dist.data import DataReport, load_splits
from rlhf_dist.errors import DataError

ROWS = [{"prompt": "Question: one?\nAnswer:", "completion": " One."},
        {"prompt": "Question: two?\nAnswer:", "completion": " Two."}]
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "It is 4."}


def compress(data: bytes, ext: str) -> bytes:
    if ext == ".gz":
        return gzip.compress(data)
    if ext == ".bz2":
        return bz2.compress(data)
    if ext == ".xz":
        return lzma.compress(data)
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def as_format(fmt: str, rows: list[dict]) -> bytes:
    if fmt == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == ".json":
        return json.dumps(rows).encode()
    if fmt == ".csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    if fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        return sink.getvalue()
    return "\n\n".join(r["text"] for r in rows).encode()


def load(kind: str, path, **kw):
    kw.setdefault("eval_fraction", 0.0)
    report = DataReport()
    train, _, _ = load_splits(DataSection(path=str(path), **kw), kind, "stage", report)
    return train.to_list(), report


def one_line_error(kind: str, path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load(kind, path, **kw)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ----------------------------------------------------------------------------------------------
# 1. Compressed files: every format, every compression, the same rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("fmt", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_compressed_files_give_the_rows_of_the_plain_file(tmp_path, fmt, ext):
    kind, rows = ("pretrain", [{"text": "alpha beta"}, {"text": "gamma"}]) if fmt == ".txt" else ("sft", ROWS)
    plain, packed = tmp_path / f"d{fmt}", tmp_path / f"d{fmt}{ext}"
    plain.write_bytes(as_format(fmt, rows))
    packed.write_bytes(compress(as_format(fmt, rows), ext))
    assert load(kind, packed)[0] == load(kind, plain)[0] == rows


# ----------------------------------------------------------------------------------------------
# 2. Malformed files: one line, with the file and the line, before any model
# ----------------------------------------------------------------------------------------------
GOOD = json.dumps(ROWS[0]) + "\n"
MALFORMED = {
    # name: (file name, bytes, expected pieces of the message)
    "empty file": ("e.jsonl", b"", ["the file is empty"]),
    "only blank lines": ("e.jsonl", b"\n\n  \n", ["the file is empty"]),
    "line that is not JSON": ("n.jsonl", (GOOD + "{prompt: oops}\n" + GOOD).encode(),
                              ["line 2: is not valid JSON", "one JSON object"]),
    "truncated last line": ("t.jsonl", (GOOD + GOOD + GOOD[:20]).encode(), ["line 3: is not valid JSON", "looks truncated"]),
    "not UTF-8": ("l.jsonl", (GOOD + '{"prompt": "caf\xe9", "completion": " x"}\n').encode("latin-1"),
                  ["line 2: is not UTF-8 text (byte 0xe9", "iconv"]),
    "a JSON list on a line": ("a.jsonl", (GOOD + "[1, 2]\n").encode(), ["line 2: is a JSON list, not an object"]),
    "corrupt parquet": ("c.parquet", b"PAR1 this is not parquet at all", ["not a readable parquet file"]),
    "corrupt gzip": ("c.jsonl.gz", b"\x1f\x8b\x08\x00garbage", ["not a readable gzip", "damaged or cut off"]),
    "truncated gzip": ("c.jsonl.gz", gzip.compress((GOOD * 50).encode())[:-30], ["not a readable gzip"]),
    "JSON document cut off": ("d.json", json.dumps(ROWS * 3, indent=1).encode()[:-15], ["line", "column", "not valid JSON",
                                                                                        "truncated"]),
    "JSON that is not a list of rows": ("d.json", b'"just a string"', ["the JSON document is a str"]),
    "CSV row with too many fields": ("d.csv", b"prompt,completion\nQ1,A1\nQ2,A2,extra\n", ["line 3: has 3 fields, the header 2"]),
    "CSV without a header": ("d.csv", b"\n\n", ["the file is empty"]),
    "not UTF-8 CSV": ("d.csv", "prompt,completion\nQ,caf\xe9\n".encode("latin-1"), ["line 2: not UTF-8", "column 6"]),
    "compressed file holding nothing": ("z.jsonl.xz", lzma.compress(b""), ["the file is empty"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_one_line_naming_file_and_line(tmp_path, case):
    name, data, pieces = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(data)
    message = one_line_error("sft", path)
    for piece in pieces:
        assert piece in message, message


def test_json_lines_under_a_json_name_are_read(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(GOOD + json.dumps(ROWS[1]) + "\n")
    assert load("sft", path)[0] == ROWS


# ----------------------------------------------------------------------------------------------
# 3. Every bad row at once; skipping them, counted
# ----------------------------------------------------------------------------------------------
def bad_file(tmp_path) -> Path:
    rows = [json.dumps({"prompt": "Q", "chosen": " good", "rejected": " bad"})] * 6
    rows[1] = json.dumps({"prompt": "Q", "chosen": " same", "rejected": " same"})
    rows[2] = '{"prompt": "Q", "chosen": '  # not JSON
    rows[4] = json.dumps({"prompt": "Q", "chosen": "", "rejected": " bad"})
    rows.append(json.dumps({"prompt": "Q", "rejected": " bad"}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_every_bad_row_is_reported_at_once(tmp_path):
    path = bad_file(tmp_path)
    message = one_line_error("preference", path)
    assert message.startswith(f"{path}: 4 of 7 rows are bad (")
    for reason in ("identical: 1", "not_json: 1", "empty: 1", "missing: 1"):
        assert reason in message, message
    # the first three, with their lines and fields, and how many more
    assert "line 3: is not valid JSON" in message
    assert "line 2: field 'chosen' equals 'rejected'" in message
    assert "line 5: field 'chosen' is empty" in message
    assert "and 1 more" in message and "stage.data.on_bad_row=skip" in message


def test_skip_drops_bad_rows_and_counts_them_by_reason(tmp_path):
    rows, report = load("preference", bad_file(tmp_path), on_bad_row="skip")
    assert len(rows) == 3 and all(r["chosen"] == " good" for r in rows)
    assert report.rows_read == 7
    assert report.bad_rows == {"identical": 1, "not_json": 1, "empty": 1, "missing": 1}
    assert report.as_dict()["bad_rows_skipped"] == {"empty": 1, "identical": 1, "missing": 1, "not_json": 1}


def test_skip_leaving_no_rows_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"chosen": "same", "rejected": "same"}) + "\n")
    assert "no usable rows (of 1)" in one_line_error("preference", path, on_bad_row="skip")


# ----------------------------------------------------------------------------------------------
# 4. Semantic checks
# ----------------------------------------------------------------------------------------------
def write(tmp_path, rows, name="d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind, row, piece", [
    ("preference", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: a"},
     "line 1: field 'chosen' equals 'rejected'"),
    ("preference", {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi you"},
     "line 1: field 'chosen' is Anthropic HH text, but 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn"),
    ("preference", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant:"},
     "line 1: field 'rejected' is empty once the shared prompt is removed"),
    ("sft", {"text": "\n\nHuman: tell me a story"}, "line 1: field 'text' is Anthropic HH text with no"),
    ("sft", {"text": "\n\nHuman: hi\n\nAssistant:   "}, "line 1: field 'text' ends in an empty Assistant turn"),
    ("prompts", {"text": "\n\nHuman: no answer"}, "line 1: field 'text' is Anthropic HH text with no"),
    ("preference", {"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "user", "content": "more?"}]},
     "line 1: field 'rejected' starts with a 'user' message once the shared prompt is removed"),
])
def test_semantic_checks(tmp_path, kind, row, piece):
    good = {"preference": {"prompt": "Q", "chosen": " a", "rejected": " b"}, "sft": {"text": "\n\nHuman: q\n\nAssistant: a"},
            "prompts": {"prompt": "Q"}}[kind]
    message = one_line_error(kind, write(tmp_path, [row, good]))
    assert piece in message, message


def test_a_file_that_mixes_formats(tmp_path):
    rows = [{"messages": [USER, ASSISTANT]}, {"text": "plain text"}, {"prompt": "Q", "completion": " A"}]
    message = one_line_error("sft", write(tmp_path, rows))
    assert "2 of 3 rows are bad (mixed_format: 2)" in message
    assert "line 2: is text data, but line 1 (the first good row) is messages; one file holds one format" in message


# ----------------------------------------------------------------------------------------------
# 5. Chat roles, against what the tokenizer's template renders
# ----------------------------------------------------------------------------------------------
STRICT = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% elif m['role'] == 'assistant' %}"
          "A: {{ m['content'] }}\n{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}")
DROPPING = ("{% for m in messages %}{% if m['role'] in ['user', 'system'] %}U: {{ m['content'] }}\n"
            "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}\n{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("template", [STRICT, DROPPING], ids=["raises", "drops"])
def test_roles_the_template_does_not_render(tmp_path, tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    rows = [{"messages": [{"role": "human", "content": "hi"}, ASSISTANT]}]
    _, report = load("sft", write(tmp_path, rows))
    assert report.roles == {"human", "assistant"}
    with pytest.raises(DataError) as info:
        lengths.check_roles(tok, report.roles, "chats.jsonl", "my-model")
    message = str(info.value)
    assert "chat role(s) 'human' are not rendered by the chat template of my-model" in message
    assert "it renders: assistant" in message and "human -> user" in message
    lengths.check_roles(tok, {"user", "assistant"}, "chats.jsonl", "my-model")  # the known ones pass


def test_messages_without_a_chat_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        lengths.check_roles(tok, {"user"}, "chats.jsonl", "base-model")


# ----------------------------------------------------------------------------------------------
# 6. HH data reused by every stage
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    from rlhf_dist.demo import synthetic

    path = tmp_path_factory.mktemp("hh") / "harmless-base.jsonl.gz"
    return path, synthetic.hh_pairs(path, n=120, n_empty=4, n_identical=3, n_long=5)


def test_hh_defects_are_all_found_in_one_run(hh):
    path, counts = hh
    message = one_line_error("preference", path)
    assert message.startswith(f"{path}: 7 of 120 rows are bad (empty_response: 4, identical: 3)")


@pytest.mark.parametrize("kind", ["preference", "sft", "prompts"])
def test_hh_file_feeds_every_kind_with_skip(hh, kind):
    path, counts = hh
    rows, report = load(kind, path, on_bad_row="skip")
    assert len(rows) == 120 - 7 and report.rows_read == 120
    assert report.bad_rows == {"empty_response": 4, "identical": 3}
    first = rows[0]
    if kind == "preference":
        assert first["prompt"].endswith("\n\nAssistant:") and first["prompt"].startswith("\n\nHuman:")
        assert "\n\nAssistant:" not in first["chosen"] and first["chosen"].strip()
    elif kind == "sft":  # the loss falls on the final assistant turn: the chosen answer
        assert set(first) == {"prompt", "completion"} and first["prompt"].endswith("\n\nAssistant:")
        assert "Human:" not in first["completion"]
    else:
        assert set(first) == {"prompt"} and first["prompt"].endswith("\n\nAssistant:")


def test_prompts_from_chat_and_sft_files(tmp_path):
    chats = write(tmp_path, [{"messages": [USER, ASSISTANT]}], "chats.jsonl")
    assert load("prompts", chats)[0] == [{"prompt": [USER]}]
    pc = write(tmp_path, [{"prompt": "Q?", "completion": " A"}], "pc.jsonl")
    assert load("prompts", pc)[0] == [{"prompt": "Q?"}]
    pairs = write(tmp_path, [{"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "5"}]}],
                  "pairs.jsonl")
    assert load("prompts", pairs)[0] == [{"prompt": [USER]}]


def test_sft_on_pairs_learns_the_chosen_answer(tmp_path):
    pairs = write(tmp_path, [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    assert load("sft", pairs)[0] == [{"prompt": "Q?", "completion": " yes"}]


# ----------------------------------------------------------------------------------------------
# 7. The length policy: counted, and done as the option says
# ----------------------------------------------------------------------------------------------
def splits(rows):
    import datasets

    return {"train": datasets.Dataset.from_list(rows), "eval": None}


def stage_cfg(stage: str, limit: int, action: str | None):
    from rlhf_dist.config.coerce import build

    training = {registry.get(stage).length_limit: limit, "output_dir": "/tmp/x"}
    if stage != "ppo":
        training.update(use_cpu=True, report_to="none")
    return build(registry.get(stage).config_class(), {"data": {"on_long_row": action}, "training": training}, stage)


def test_ppo_prompts_truncated_on_the_left_and_counted(tokenizer):
    long, short = "Question: " + "the village of Ulm grows wheat. " * 10 + "what grows?\nAnswer:", "Question: hi?\nAnswer:"
    report = DataReport()
    out = lengths.apply("ppo", stage_cfg("ppo", 16, None), splits([{"prompt": long}, {"prompt": short}]), tokenizer, report)
    ids = out["train"]["input_ids"]
    full = tokenizer(long)["input_ids"]
    assert ids[0] == full[-16:] and ids[1] == tokenizer(short)["input_ids"]  # the end, with the question, is kept
    assert report.too_long == {"train": {"limit": 16, "action": "truncate", "truncated": 1}}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_skip_and_error(tokenizer, stage):
    long_prompt = "Question: " + "the village of Ulm grows wheat. " * 10 + "what?\nAnswer:"
    row = {"ppo": {"prompt": long_prompt}, "sft": {"prompt": long_prompt, "completion": " A."}}.get(
        stage, {"prompt": long_prompt, "chosen": " A.", "rejected": " B."})
    short = {k: (v if k != "prompt" else "Question: hi?\nAnswer:") for k, v in row.items()}
    report = DataReport()
    out = lengths.apply(stage, stage_cfg(stage, 24, "skip"), splits([row, short, short]), tokenizer, report)
    assert len(out["train"]) == 2 and report.too_long["train"]["skipped"] == 1
    limit = registry.get(stage).length_limit
    with pytest.raises(DataError, match=rf"1 of 3 train rows are longer than {stage}.training.{limit}=24 "
                                        rf"tokens .*set {stage}.data.on_long_row=truncate or skip"):
        lengths.apply(stage, stage_cfg(stage, 24, "error"), splits([row, short, short]), tokenizer, DataReport())


def test_defaults_follow_the_trainers(tokenizer):
    assert {s: lengths.policy(s, DataSection()) for s, spec in registry.STAGES.items() if spec.length_rule} == {
        "sft": "truncate", "reward": "skip", "dpo": "truncate", "ppo": "truncate", "kto": "truncate", "eval": "truncate"}


def test_reward_pairs_tokenised_as_trl_does(tokenizer):
    """The reward stage's rows are tokenised here; they must equal what TRL's RewardTrainer makes of the same text
    (its own _prepare_dataset, run on the text rows), strings and chats alike."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    rows = [{"prompt": "Question: hi?\nAnswer:", "chosen": " Yes.", "rejected": " No."},
            {"prompt": "Question: where is Ulm?\nAnswer:", "chosen": " Far away.", "rejected": " No idea, go away."}]
    chats = [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "It is 5."}]}]
    args = RewardConfig(output_dir="/tmp/unused", max_length=None, use_cpu=True, report_to="none")
    for text_rows in (rows, chats):
        ours = lengths.apply("reward", stage_cfg("reward", 512, None), splits(text_rows), tokenizer, DataReport())["train"]
        trl = RewardTrainer._prepare_dataset(None, datasets.Dataset.from_list(text_rows), tokenizer, args, "train")
        assert ours["chosen_ids"] == trl["chosen_ids"] and ours["rejected_ids"] == trl["rejected_ids"]


def test_dpo_rows_whose_prompt_fills_the_limit_are_counted(tokenizer):
    long_prompt = "Question: " + "the village of Ulm grows wheat. " * 10 + "what?\nAnswer:"
    rows = [{"prompt": long_prompt, "chosen": " A.", "rejected": " B."},
            {"prompt": "Question: " + "Ulm. " * 4 + "?\nAnswer:", "chosen": " A long answer " * 6, "rejected": " B."},
            {"prompt": "Question: hi?\nAnswer:", "chosen": " A.", "rejected": " B."}]
    report = DataReport()
    out = lengths.apply("dpo", stage_cfg("dpo", 24, None), splits(rows), tokenizer, report)
    assert len(out["train"]) == 2
    assert report.too_long["train"] == {"limit": 24, "action": "truncate", "prompt_fills_max_length": 1, "truncated": 1}


def test_pretraining_folder_is_checked_without_becoming_python_rows(tmp_path):
    """A dataset folder (as a hub dataset loads) for pretraining stays a Dataset; its bad rows are found by number."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder, [{"text": "a"}, {"text": "  "}, {"text": "b"}, {"text": ""}], "train.jsonl")
    assert "2 of 4 rows are bad (empty: 2): row 2: field 'text' is empty; row 4:" in one_line_error("pretrain", folder)
    rows, report = load("pretrain", folder, on_bad_row="skip")
    assert rows == [{"text": "a"}, {"text": "b"}] and report.bad_rows == {"empty": 2} and report.rows_read == 4
    rows, report = load("pretrain", folder, skip_empty=True)  # wikitext's blank lines: dropped, not bad rows
    assert rows == [{"text": "a"}, {"text": "b"}] and report.bad_rows == {}


# ----------------------------------------------------------------------------------------------
# 8. No malformed file ends in a traceback: seeded random damage to valid files of every format
# ----------------------------------------------------------------------------------------------
def damaged(data: bytes, rng) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # cut off anywhere
        return data[:rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out))
        if kind == 1:  # bytes flipped
            out[at] = rng.randrange(256)
        elif kind == 2:  # bytes inserted
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        else:  # bytes removed
            del out[at:at + rng.randint(1, 3)]
    return bytes(out)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet", "d.txt", "d.jsonl.gz", "d.csv.zst"])
def test_damaged_files_give_rows_or_one_line_never_a_traceback(tmp_path, name):
    import random

    fmt = "." + name.split(".")[1]
    kind, rows = ("pretrain", [{"text": "alpha beta"}, {"text": "gamma"}]) if fmt == ".txt" else ("sft", ROWS * 3)
    data = as_format(fmt, rows)
    if name.count(".") == 2:
        data = compress(data, "." + name.split(".")[2])
    rng = random.Random(name)
    outcomes = {"rows": 0, "error": 0}
    for i in range(60):
        path = tmp_path / f"{i}-{name}"
        path.write_bytes(damaged(data, rng))
        try:
            load(kind, path)
            outcomes["rows"] += 1
        except DataError as exc:  # anything else is a bug: it fails the test with its traceback
            message = str(exc)
            assert "\n" not in message and str(path) in message, message
            outcomes["error"] += 1
    assert outcomes["error"] > 0, outcomes  # the damage was real


VALUES = [None, "", "  ", "text", 0, 1.5, True, [], ["a"], [1, 2], {}, {"role": "user"}, [{"role": "user"}],
          [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
          [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], [{"role": 1, "content": "x"}],
          [{"role": "user", "content": ["part"]}], "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi\n\nAssistant: a"]


@pytest.mark.parametrize("kind", ["pretrain", "sft", "preference", "prompts"])
def test_rows_of_every_shape_give_rows_or_one_line(tmp_path, kind):
    """Seeded rows whose fields take every JSON shape (missing, null, empty, numbers, lists, broken messages, HH
    text): each file loads or fails in one line naming the file; never an Arrow or Python traceback."""
    import random

    rng = random.Random(kind)
    fields = ["text", "prompt", "completion", "messages", "chosen", "rejected"]
    seen = set()
    for i in range(150):
        rows = [{f: rng.choice(VALUES) for f in rng.sample(fields, rng.randint(1, 4))} for _ in range(rng.randint(1, 4))]
        path = write(tmp_path, rows, f"{i}.jsonl")
        try:
            load(kind, path, on_bad_row=rng.choice(["error", "skip"]))
            seen.add("rows")
        except DataError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
            seen.add("error")
    assert seen == {"rows", "error"}


def test_dpo_counts_match_what_trl_itself_drops_and_cuts(tokenizer):
    """Our length measure against TRL's DPOTrainer._prepare_dataset on the same rows: the rows TRL drops (prompt fills
    max_length) are the ones counted prompt_fills_max_length, and the ones it will cut are the ones counted truncated."""
    import random
    import types

    import datasets
    from trl import DPOConfig, DPOTrainer

    rng = random.Random(0)
    rows = [{"prompt": "Question: " + "Ulm grows wheat. " * rng.randint(0, 8) + "what?\nAnswer:",
             "chosen": " Yes." * rng.randint(1, 12), "rejected": " No." * rng.randint(1, 12)} for _ in range(40)]
    limit = 30
    report = DataReport()
    ours = lengths.apply("dpo", stage_cfg("dpo", limit, None), splits(rows), tokenizer, report)["train"]
    args = DPOConfig(output_dir="/tmp/unused", max_length=limit, use_cpu=True, report_to="none")
    trl = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset.from_list(rows),
                                      tokenizer, args, "train")
    counts = report.too_long["train"]
    assert len(trl) == len(ours) == len(rows) - counts["prompt_fills_max_length"] and counts["prompt_fills_max_length"] > 0
    cut = sum(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > limit for r in trl)
    assert cut == counts["truncated"] > 0


def test_sft_counts_match_what_trl_itself_drops_and_cuts(tokenizer):
    """The same against TRL's SFTTrainer._prepare_dataset (loss on the completion only, TRL's default)."""
    import random
    import types

    import datasets
    from trl import SFTConfig, SFTTrainer

    rng = random.Random(1)
    rows = [{"prompt": "Question: " + "Ulm grows wheat. " * rng.randint(0, 8) + "what?\nAnswer:",
             "completion": " Yes." * rng.randint(1, 12)} for _ in range(40)]
    limit = 30
    report = DataReport()
    ours = lengths.apply("sft", stage_cfg("sft", limit, None), splits(rows), tokenizer, report)["train"]
    args = SFTConfig(output_dir="/tmp/unused", max_length=limit, use_cpu=True, report_to="none")
    untruncated = SFTConfig(output_dir="/tmp/unused", max_length=None, use_cpu=True, report_to="none")
    me = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    trl = SFTTrainer._prepare_dataset(me, datasets.Dataset.from_list(rows), tokenizer, args, False, None, "train")
    full = SFTTrainer._prepare_dataset(me, datasets.Dataset.from_list(rows), tokenizer, untruncated, False, None, "train")
    counts = report.too_long["train"]
    assert len(trl) == len(ours) == len(rows) - counts["prompt_fills_max_length"] and counts["prompt_fills_max_length"] > 0
    kept = [len(r["input_ids"]) for r in full if sum(1 for x in r["labels"][:limit] if x != -100)]
    assert sum(n > limit for n in kept) == counts["truncated"] > 0


def test_a_dataset_folder_laid_out_like_hh_rlhf_with_data_dir(tmp_path):
    """Anthropic/hh-rlhf's layout (harmless-base/{train,test}.jsonl.gz, ...): data_dir picks the subset, eval_split its
    test file; the defects of the real data are found in the gzipped files of the folder too."""
    from rlhf_dist.demo import synthetic

    root = tmp_path / "hh-rlhf"
    synthetic.hh_pairs(root / "harmless-base" / "train.jsonl.gz", n=40, n_empty=2, n_identical=1, n_long=0)
    synthetic.hh_pairs(root / "harmless-base" / "test.jsonl.gz", seed=1, n=20, n_empty=1, n_identical=0, n_long=0)
    synthetic.hh_pairs(root / "helpful-base" / "train.jsonl.gz", seed=2, n=30, n_empty=0, n_identical=0, n_long=0)
    synthetic.hh_pairs(root / "helpful-base" / "test.jsonl.gz", seed=3, n=10, n_empty=0, n_identical=0, n_long=0)
    report = DataReport()
    cfg = DataSection(path=str(root), data_dir="harmless-base", eval_split="test", on_bad_row="skip")
    train, evaluation, _ = load_splits(cfg, "preference", "dpo", report)
    assert (len(train), len(evaluation)) == (37, 19)
    assert report.rows_read == 60 and report.bad_rows == {"empty_response": 3, "identical": 1}
    with pytest.raises(DataError, match=r"hh-rlhf: 3 of 40 rows are bad \(empty_response: 2, identical: 1\): row "):
        load_splits(DataSection(path=str(root), data_dir="harmless-base", eval_split="test"), "preference", "dpo")


def test_length_error_names_the_file_of_its_split(tokenizer):
    import datasets

    from rlhf_dist.config.coerce import build

    data = {"path": "train.jsonl", "eval_path": "held_out.jsonl", "on_long_row": "error"}
    cfg = build(registry.get("ppo").config_class(), {"data": data, "training": {"max_prompt_length": 8, "output_dir": "/tmp/x"}},
                "ppo")
    short, long = {"prompt": "Question: hi?"}, {"prompt": "Question: " + "Ulm grows wheat. " * 6}
    ds = {"train": datasets.Dataset.from_list([short]), "eval": datasets.Dataset.from_list([long])}
    with pytest.raises(DataError, match=r"^held_out.jsonl: 1 of 1 eval rows are longer than ppo.training.max_prompt_length=8"):
        lengths.apply("ppo", cfg, ds, tokenizer, DataReport())
