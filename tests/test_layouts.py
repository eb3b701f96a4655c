"""Bring your own data: every stage reads TRL's layouts besides StackLLaMA's columns (common/layouts.py), detects
them from the columns, checks every row, and renders conversations the same way everywhere."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from common.data import DataError
from common.layouts import detect, load_layout, load_normalized, load_pairs, split_implicit
from conftest import ROOT, assert_user_error, run_script

QUESTIONS = ["How do I sort a list in Python?", "How do I undo my last git commit?", "How do I list files in bash?",
             "Why does `==` differ from `===` in JavaScript?"]
GOOD = ["Use `sorted(items)`:\n```python\nsorted(items)\n```", "Run `git reset --soft HEAD~1`.",
        "Use `ls -la` in the folder.", "`===` does not convert types."]
BAD = ["You cannot.", "Delete the repository.", "Reinstall bash.", "They are the same."]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def prompt_text(q):
    return f"Question: {q}\n\nAnswer: "


# The same four pairs in every layout (the conversational ones render exactly as StackLLaMA's without a chat
# template; the standard prompt is the literal text before the answer).
LAYOUTS = {
    "stackllama": [{"question": q, "response_j": g, "response_k": b} for q, g, b in zip(QUESTIONS, GOOD, BAD)],
    "prompt-completion": [{"prompt": prompt_text(q), "completion": g} for q, g in zip(QUESTIONS, GOOD)],
    "messages": [{"messages": user(q) + assistant(g)} for q, g in zip(QUESTIONS, GOOD)],
    "preference": [{"prompt": prompt_text(q), "chosen": g, "rejected": b} for q, g, b in zip(QUESTIONS, GOOD, BAD)],
    "preference-chat": [{"prompt": user(q), "chosen": assistant(g), "rejected": assistant(b)}
                        for q, g, b in zip(QUESTIONS, GOOD, BAD)],
    "implicit-chat": [{"chosen": user(q) + assistant(g), "rejected": user(q) + assistant(b)}
                      for q, g, b in zip(QUESTIONS, GOOD, BAD)],
    "prompt": [{"prompt": prompt_text(q)} for q in QUESTIONS],
    "prompt-chat": [{"prompt": user(q)} for q in QUESTIONS],
}
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write(tmp_path, name, rows, repeat=1) -> str:
    path = tmp_path / name / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * repeat))
    return str(path)


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with a chat template whose end of turn is the EOS token (as Llama-2-chat's and Zephyr's)."""
    from transformers import AutoTokenizer

    out = str(tmp_path_factory.mktemp("chat") / "model")
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("kind, columns, name", [
    ("sft", ["qid", "question", "response_j", "response_k"], "stackllama"),
    ("sft", ["prompt", "completion", "id"], "prompt-completion"),
    ("sft", ["messages"], "messages"),
    ("sft", ["text", "source"], "text"),
    ("sft", ["question", "response_j", "text"], "stackllama"),  # StackLLaMA's columns win
    ("pairs", ["prompt", "chosen", "rejected"], "preference"),  # the most specific, not the implicit prompt
    ("pairs", ["chosen", "rejected", "score"], "implicit-prompt preference"),
    ("pairs", ["question", "response_j", "response_k", "pair_kind"], "stackllama"),
    ("prompts", ["prompt", "chosen", "rejected"], "prompt"),
    ("prompts", ["question", "answer_key"], "stackllama"),
])
def test_the_layout_is_detected_from_the_columns(kind, columns, name):
    spec, _ = detect(kind, columns, {}, "file x.jsonl")
    assert spec.name == name


def test_an_unknown_or_ambiguous_layout_lists_the_columns_and_the_layouts():
    with pytest.raises(DataError) as e:
        detect("pairs", ["instruction", "good", "bad"], {}, "file x.jsonl")
    message = str(e.value)
    assert "file x.jsonl" in message and "instruction, good, bad" in message
    assert "stackllama (question, response_j, response_k)" in message
    assert "preference (prompt, chosen, rejected)" in message
    assert "--columns" in message
    with pytest.raises(DataError, match="ambiguous data layout.*prompt, completion, text.*prompt-completion and "
                                        "text; accepted layouts: stackllama .*messages"):
        detect("sft", ["prompt", "completion", "text"], {}, "file x.jsonl")


def test_columns_map_other_names_and_choose_between_layouts():
    spec, cols = detect("pairs", ["instruction", "good", "bad"],
                        {"prompt": "instruction", "chosen": "good", "rejected": "bad"}, "f")
    assert spec.name == "preference" and cols == {"prompt": "instruction", "chosen": "good", "rejected": "bad"}
    spec, cols = detect("sft", ["prompt", "completion", "text"], {"text": "text"}, "f")
    assert spec.name == "text"
    spec, cols = detect("sft", ["title", "response_j"], {"question": "title"}, "f")  # StackLLaMA's, renamed
    assert spec.name == "stackllama" and cols == {"question": "title", "completion": "response_j"}
    with pytest.raises(DataError, match="--columns prompt=instruction: f has no column 'instruction'"):
        detect("pairs", ["prompt", "chosen", "rejected"], {"prompt": "instruction"}, "f")
    with pytest.raises(DataError, match="'answer' is not a column name of these layouts"):
        detect("pairs", ["prompt", "chosen", "rejected"], {"answer": "chosen"}, "f")


# ---------------------------------------------------------------------------------------------- row checks


MESSAGES = {"messages": user("q") + assistant("a")}
CHAT_PAIR = {"prompt": user("q"), "chosen": assistant("a"), "rejected": assistant("b")}
IMPLICIT = {"chosen": user("q") + assistant("a"), "rejected": user("q") + assistant("b")}


@pytest.mark.parametrize("kind, good, bad, needle", [
    ("sft", MESSAGES, {"messages": user("q") + [{"role": "bot", "content": "a"}]},
     "field 'messages', message 2: role 'bot' is not one of"),
    ("sft", MESSAGES, {"messages": user("q") + [{"role": "assistant", "content": ""}]},
     "field 'messages', message 2: 'content' is an empty string"),
    ("sft", MESSAGES, {"messages": user("q") + assistant("a") + user("and?")},
     "the last message is not the assistant's"),
    ("sft", {"prompt": user("q"), "completion": assistant("a")}, {"prompt": user("q"), "completion": "a"},
     "field 'completion' is a string, not a list of messages"),
    ("pairs", CHAT_PAIR, {**CHAT_PAIR, "rejected": []}, "field 'rejected' is an empty list of messages"),
    ("pairs", CHAT_PAIR, {**CHAT_PAIR, "chosen": user("a")}, "field 'chosen' does not start with an assistant message"),
    ("pairs", IMPLICIT, {**IMPLICIT, "rejected": user("other") + assistant("b")}, "share no first messages"),
    ("pairs", {"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: no"},
     {"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: yes"}, "share no prompt"),
    ("prompts", {"prompt": user("q")}, {"prompt": user("q") + assistant("a")}, "ends with an assistant message"),
    ("prompts", {"prompt": "q"}, {"prompt": None}, "field 'prompt' is null"),
])
def test_each_layouts_rows_are_checked_with_file_row_and_field(tmp_path, kind, good, bad, needle):
    path = write(tmp_path, "d", [good, bad])  # the bad row is row 2
    with pytest.raises(DataError) as e:
        load_layout(kind, path, None, "train")
    assert f"file {path}, row 2" in str(e.value) and needle in str(e.value)


def test_a_bad_row_of_a_new_layout_is_one_error_line_from_the_script(tmp_path):
    path = write(tmp_path, "pairs", LAYOUTS["preference-chat"] + [{"prompt": user("q"), "chosen": assistant(""),
                                                                    "rejected": assistant("b")}])
    proc = run_script("training_reward_model.py", "--model_name_or_path", "unused", "--dataset_name", path,
                      "--output_dir", str(tmp_path / "out"), check=False)
    assert_user_error(proc, f"file {path}, row 5: field 'chosen', message 1: 'content' is an empty string")
    proc = run_script("training_sft.py", "--model_name_or_path", "unused", "--dataset_name", path,
                      "--output_dir", str(tmp_path / "out"), check=False)
    assert_user_error(proc, "no known data layout", "prompt, chosen, rejected",
                      "prompt-completion (prompt, completion)")


def test_the_implicit_prompt_is_the_shared_start():
    chosen, rejected = user("q") + assistant("yes"), user("q") + assistant("no")
    assert split_implicit(chosen, rejected) == (user("q"), assistant("yes"), assistant("no"))
    # strings: back to the last whitespace, so a shared first letter stays with the answers
    assert split_implicit("Human: hi\n\nAssistant: Sure, here", "Human: hi\n\nAssistant: Sorry") == \
        ("Human: hi\n\nAssistant: ", "Sure, here", "Sorry")


# ---------------------------------------------------------------------------------------------- one text layout


def _tokens(tiny_model, tmp_path, layout, kind):
    """What each stage feeds its model for a file of ``layout``: SFT's ids and mask, the reward model's chosen and
    rejected ids, DPO's prompt/chosen/rejected ids, PPO's prompt ids."""
    import training_dpo
    import training_reward_model
    import training_rl
    import training_sft
    from common.modeling import load_tokenizer

    path = write(tmp_path, layout, LAYOUTS[layout])
    right = load_tokenizer(tiny_model, padding_side="right")
    if kind == "sft":
        ds = training_sft.tokenize(load_normalized("sft", path, None, "train")[0].dataset, right, False)
        return ds["input_ids"], ds["completion_mask"]
    if kind == "pairs":
        rows, _ = load_pairs(path, None, "train", 0)
        rm, _ = training_reward_model.tokenize_pairs(rows, right, training_reward_model.ScriptArguments(), 512, "t",
                                                     verbose=False)
        dpo, _ = training_dpo.tokenize_pairs(rows, right, training_dpo.ScriptArguments(max_prompt_length=200), 512,
                                             "t", verbose=False)
        return rm["chosen_ids"], rm["rejected_ids"], dpo["prompt_ids"], dpo["chosen_ids"], dpo["rejected_ids"]
    left = load_tokenizer(tiny_model, padding_side="left")
    prompts, _, _ = training_rl.load_prompts(training_rl.ScriptArguments(dataset_name=path, subset=""), left)
    return prompts["input_ids"]


@pytest.mark.parametrize("kind, layouts", [
    ("sft", ["prompt-completion", "messages"]),
    ("pairs", ["preference", "preference-chat", "implicit-chat"]),
    ("prompts", ["prompt", "prompt-chat"]),
])
def test_every_layout_gives_the_stackllama_tokens_without_a_chat_template(tiny_model, tmp_path, kind, layouts):
    reference = _tokens(tiny_model, tmp_path, "stackllama", kind)
    for layout in layouts:
        assert _tokens(tiny_model, tmp_path, layout, kind) == reference, layout


def test_with_a_chat_template_every_stage_renders_one_text(chat_model, tmp_path):
    """SFT trains, the reward model scores, DPO compares and PPO samples from the same text; a generated answer is
    scored as the training pair with that answer; --assistant_only_loss trains exactly the assistant turns."""
    import training_dpo
    import training_reward_model
    import training_rl
    import training_sft
    from common.layouts import completion_text
    from common.modeling import load_tokenizer
    from common.prompts import render_answer, render_prompt

    tok = load_tokenizer(chat_model, padding_side="right")
    rows, _ = load_pairs(write(tmp_path, "p", LAYOUTS["preference-chat"]), None, "train", 0)
    row = rows[0]
    rendered = render_prompt(tok, row["prompt"])
    assert rendered == f"<|user|>\n{QUESTIONS[0]}</s>\n<|assistant|>\n"
    whole = rendered + completion_text(tok, row["prompt"], row["chosen"])
    assert whole == render_answer(tok, row["prompt"], GOOD[0]) == rendered + GOOD[0] + "</s>\n"

    rm, _ = training_reward_model.tokenize_pairs(rows, tok, training_reward_model.ScriptArguments(), 512, "t",
                                                 verbose=False)
    assert rm["chosen_ids"][0] == tok(whole)["input_ids"]  # the template's </s> ends it: no second EOS
    dpo, _ = training_dpo.tokenize_pairs(rows, tok, training_dpo.ScriptArguments(max_prompt_length=200), 512, "t",
                                         verbose=False)
    left = load_tokenizer(chat_model, padding_side="left")
    prompts, _, _ = training_rl.load_prompts(
        training_rl.ScriptArguments(dataset_name=write(tmp_path, "r", LAYOUTS["prompt-chat"]), subset=""), left)
    assert dpo["prompt_ids"][0] == prompts["input_ids"][0] == tok(rendered)["input_ids"]

    two_turns = [{"messages": user("a?") + assistant("A1") + user("b?") + assistant("B2")}]
    ds = load_normalized("sft", write(tmp_path, "m", two_turns), None, "train")[0].dataset
    for assistant_only, trained in ((False, ["B2</s>\n"]), (True, ["A1</s>\n", "B2</s>\n"])):
        out = training_sft.tokenize(ds, tok, False, assistant_only)[0]
        ids, mask = out["input_ids"], out["completion_mask"]
        assert tok.decode(ids) == tok.decode(tok("<|user|>\na?</s>\n<|assistant|>\nA1</s>\n<|user|>\nb?</s>\n"
                                                 "<|assistant|>\nB2</s>\n")["input_ids"])
        runs, current = [], []
        for i, m in zip(ids, mask):
            if m:
                current.append(i)
            elif current:
                runs, current = runs + [current], []
        runs += [current] if current else []
        assert [tok.decode(r) for r in runs] == trained


def test_generate_writes_the_same_sample_data_in_trl_and_chat_layouts(tmp_path):
    for fmt in ("trl", "chat"):
        out = tmp_path / fmt
        proc = subprocess.run([sys.executable, "data/generate.py", "--format", fmt, "--out_dir", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        for split, kind in (("finetune", "sft"), ("reward", "pairs"), ("evaluation", "pairs"), ("rl", "prompts")):
            mine = [json.loads(line) for line in open(out / split / "train.jsonl", encoding="utf-8")]
            committed = [json.loads(line) for line in open(os.path.join(ROOT, "data", split, "train.jsonl"),
                                                            encoding="utf-8")]
            assert len(mine) == len(committed)
            loaded, layout = load_normalized(kind, str(out), split, "train")
            assert layout.conversational == (fmt == "chat")
            assert loaded.dataset["question"][:5] == [
                (r["question"] if fmt == "chat" else prompt_text(r["question"])) for r in committed[:5]]
            assert [r["answer_key"] for r in mine[:5]] == [r["answer_key"] for r in committed[:5]]


# ---------------------------------------------------------------------------------------------- the stages


PAIRS = {"train_subset": 0, "eval_subset": 0, "max_length": 256, "max_steps": 2, "per_device_train_batch_size": 4,
         "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "seed": 3, "disable_tqdm": True}


@pytest.mark.slow
def test_the_same_pairs_in_stackllama_and_trl_columns_give_the_same_reward_model(tiny_model, tmp_path):
    from common.outputs import read_metrics
    from training_reward_model import run_reward_model

    losses = {}
    for layout in ("stackllama", "preference"):
        data = os.path.dirname(os.path.dirname(write(tmp_path, f"{layout}/reward", LAYOUTS[layout], repeat=4)))
        write(tmp_path, f"{layout}/evaluation", LAYOUTS[layout])
        out = str(tmp_path / f"rm_{layout}")
        run_reward_model(model_name_or_path=tiny_model, dataset_name=data, train_data_dir="reward",
                         eval_data_dir="evaluation", output_dir=out, **PAIRS)
        losses[layout] = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses["stackllama"]) == 2 and losses["stackllama"] == losses["preference"]


@pytest.mark.slow
def test_each_stage_runs_on_the_new_layouts(tiny_model, chat_model, tmp_path):
    from common.outputs import read_metrics
    from evaluate import run_evaluate
    from training_dpo import run_dpo
    from training_reward_model import run_reward_model
    from training_rl import run_rl
    from training_sft import run_sft

    sft = {"size_valid_set": 4, "seq_length": 64, "max_steps": 2, "eval_freq": 2, "save_freq": 2, "log_freq": 1,
           "disable_tqdm": True}
    data = {name: os.path.dirname(write(tmp_path, name, rows, repeat=4)) for name, rows in LAYOUTS.items()}
    data["text"] = os.path.dirname(write(tmp_path, "text", [{"text": prompt_text(q) + g} for q, g in
                                                             zip(QUESTIONS, GOOD)], repeat=4))
    for name, model, extra in (("prompt-completion", tiny_model, {}), ("text", tiny_model, {}),
                               ("messages", chat_model, {"assistant_only_loss": True})):
        result = run_sft(model_name_or_path=model, dataset_name=data[name], subset="", output_dir=str(tmp_path / name),
                         **sft, **extra)
        assert result.metrics["steps"] == 2 and result.metrics["eval_loss_last"] is not None, name

    rms = {}
    for name, model in (("preference-chat", chat_model), ("implicit-chat", chat_model), ("preference", tiny_model)):
        out = str(tmp_path / f"rm-{name}")
        rms[name] = run_reward_model(model_name_or_path=model, dataset_name=data[name], train_data_dir="",
                                     eval_data_dir="", output_dir=out, **PAIRS)
        assert rms[name].metrics["eval_pairs"] == 16, name
    dpo = run_dpo(model_name_or_path=chat_model, dataset_name=data["preference-chat"], train_data_dir="",
                  eval_data_dir="", output_dir=str(tmp_path / "dpo"), **PAIRS)
    assert dpo.metrics["steps"] == 2 and dpo.metrics["eval_pairs"] == 16

    rl = {"steps": 8, "batch_size": 4, "mini_batch_size": 2, "gradient_accumulation_steps": 1, "output_min_length": 4,
          "output_max_length": 6, "eval_freq": 1, "eval_prompts": 4, "disable_tqdm": True}
    for algorithm, name in (("ppo", "prompt-chat"), ("grpo", "prompt")):
        out = str(tmp_path / algorithm)
        run_rl(algorithm=algorithm, model_name=chat_model, reward_model_name=rms["preference-chat"].output_dir,
               dataset_name=data[name], subset="", eval_data_dir="", output_dir=out, **rl)
        samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"), encoding="utf-8")]
        assert {s["question"] for s in samples} <= set(QUESTIONS) | {prompt_text(q) for q in QUESTIONS}
        assert [m["step"] for m in read_metrics(out) if "objective/scores" in m] == [1, 2]
    ev = run_evaluate(models={"base": chat_model}, reward_model_name=rms["preference-chat"].output_dir,
                      dataset_name=data["prompt-chat"], subset="", num_prompts=4, max_new_tokens=6, best_of_n=2,
                      best_of_n_prompts=2, output_dir=str(tmp_path / "eval"))
    assert ev.results["prompts"]["n"] == 4 and [r["question"] for r in ev.results["rows"]] == QUESTIONS


def test_a_streamed_conversation_is_checked_past_the_first_rows(tmp_path, monkeypatch):
    import common.data

    monkeypatch.setattr(common.data, "STREAMING_PEEK_ROWS", 2)
    rows = [MESSAGES] * 3 + [{"messages": user("q") + [{"role": "assistant", "content": None}]}]
    path = write(tmp_path, "s", rows)
    loaded, layout = load_normalized("sft", path, None, "train", streaming=True)
    assert layout.name == "messages"
    with pytest.raises(DataError, match=f"file {path}, row 4: field 'messages', message 2: 'content' is null"):
        list(loaded.dataset)


def test_columns_from_yaml_and_trls_dataset_text_field(tmp_path):
    import yaml

    import training_reward_model
    from common.layouts import parse_columns

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"columns": {"prompt": "instruction"}}))
    script, _, _ = training_reward_model.parse(["--config", str(config)])
    spec, cols = detect("pairs", ["instruction", "chosen", "rejected"], parse_columns(script.columns), "f")
    assert spec.name == "preference" and cols["prompt"] == "instruction"
    # SFT's --dataset_text_field names the text column; a column of conversations there is read as messages
    for rows, field, needle in (
            ([{"body": "Question: a?\n\nAnswer: b"}, {"body": ""}], "body", "field 'body' is an empty string"),
            ([{"dialog": user("q") + assistant("a")}, {"dialog": user("q") + [{"role": "bot", "content": "a"}]}],
             "dialog", "field 'dialog', message 2: role 'bot'")):
        path = write(tmp_path, field, rows)
        proc = run_script("training_sft.py", "--model_name_or_path", "unused", "--dataset_name", path,
                          "--dataset_text_field", field, "--output_dir", str(tmp_path / "out"), check=False)
        assert_user_error(proc, f"file {path}, row 2: {needle}")
