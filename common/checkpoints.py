"""What a checkpoint says about itself: which model it was trained from, and whether it was written whole.

Every checkpoint (SFT, reward model, DPO, PPO, RLOO, GRPO) ends with ``origin.json``, written after everything else:
the base model's name or path, a fingerprint of its architecture (the config's shape and the tokenizer's size) and
the list of the checkpoint's files with their sizes. A resume compares the fingerprint with the model it loads
(``check_origin``: another model is one error line naming both) and a checkpoint is complete when every listed file
is there at its size (``missing_files``). Checkpoints written before ``origin.json`` existed count as complete when
their ``trainer_state.json`` parses, as they always did.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from common.errors import UserError

ORIGIN_FILE = "origin.json"
STATE_FILE = "trainer_state.json"  # the Trainer's, and PPO's: the step a checkpoint holds
# The config fields that make two models interchangeable for a resume (the text model's, for multimodal configs).
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings", "tie_word_embeddings")


def fingerprint(model, tokenizer) -> dict:
    """The architecture of ``model`` (a transformers model, or peft's wrapper of one) and the size of its tokenizer,
    with a short digest of both."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = {k: getattr(text, k) for k in ARCH_KEYS if isinstance(getattr(text, k, None), (int, float, str, bool))}
    arch["model_type"] = getattr(config, "model_type", arch.get("model_type"))
    arch["tokenizer_size"] = len(tokenizer)
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {"architecture": arch, "digest": digest}


def origin(base_model: str, model, tokenizer, stage: str) -> dict:
    """What a checkpoint of ``stage`` records of the model it trains (``write_origin`` adds the file list)."""
    return {"stage": stage, "base_model": base_model, "fingerprint": fingerprint(model, tokenizer)}


def write_origin(folder: str, record: dict) -> None:
    """``origin.json`` into a checkpoint folder whose other files are all written: ``record`` and every file's
    relative path and size. It is the checkpoint's last file."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    files.pop(ORIGIN_FILE, None)
    with open(os.path.join(folder, ORIGIN_FILE), "w", encoding="utf-8") as f:
        json.dump({**record, "files": dict(sorted(files.items()))}, f, indent=1)


def read_origin(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, ORIGIN_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def missing_files(folder: str) -> list[str]:
    """What a checkpoint lacks to be complete (empty: complete). With ``origin.json``: the files it lists that are
    absent or of another size; without: ``origin.json`` itself when the folder's own files say it was written by
    this version (a save cut short), else ``trainer_state.json`` if it does not parse (a checkpoint of an earlier
    version)."""
    record = read_origin(folder)
    if record is not None and isinstance(record.get("files"), dict):
        paths = {name: os.path.join(folder, name) for name in record["files"]}
        return [name for name, size in record["files"].items()
                if not os.path.isfile(paths[name]) or os.path.getsize(paths[name]) != size]
    try:
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
            state_ok = "global_step" in json.load(f)
    except (OSError, ValueError):
        state_ok = False
    if not state_ok:
        return [STATE_FILE, ORIGIN_FILE]
    return []


def checkpoints(output_dir: str) -> dict[int, str]:
    """Step -> folder of every complete ``checkpoint-N`` in ``output_dir`` (``checkpoint-N.old`` when
    ``checkpoint-N`` is missing: a swap cut short between its two renames; never ``checkpoint-N.tmp``)."""
    found = {}
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):  # checkpoint-N before checkpoint-N.old
            m = re.fullmatch(r"checkpoint-(\d+)(\.old)?", name)
            path = os.path.join(output_dir, name)
            if m and int(m.group(1)) not in found and os.path.isdir(path) and not missing_files(path):
                found[int(m.group(1))] = path
    return found


def newest(output_dir: str) -> str | None:
    found = checkpoints(output_dir)
    return found[max(found)] if found else None


def incomplete_message(folder: str, flag: str = "--resume_from_checkpoint") -> str:
    """One line: what ``folder`` lacks, and the newest complete checkpoint beside it."""
    missing = missing_files(folder) or [f"{ORIGIN_FILE} (written last)"]
    cut = " (a save cut short: a .tmp folder is never resumed from)" if folder.rstrip("/").endswith(".tmp") else ""
    beside = newest(os.path.dirname(os.path.abspath(folder.rstrip("/"))))
    where = f"the newest complete checkpoint is {beside}" if beside else "there is no complete checkpoint beside it"
    return f"{flag} {folder} is incomplete{cut}: missing {', '.join(missing[:3])}" \
           f"{' ...' if len(missing) > 3 else ''}; {where}"


def check_origin(checkpoint: str, record: dict) -> str | None:
    """Refuse to resume ``checkpoint`` onto a model of another architecture than the one it was trained from, or in
    another stage (one ``UserError`` naming both); returns a note when only the name differs (a moved folder, a Hub
    id for a local copy), None when they agree or the checkpoint predates ``origin.json``."""
    saved = read_origin(checkpoint)
    if saved is None or "fingerprint" not in saved:
        return None
    was, now = saved.get("base_model"), record["base_model"]
    if saved.get("stage") and record.get("stage") and saved["stage"] != record["stage"]:
        raise UserError(f"cannot resume {checkpoint}: it is a checkpoint of the {saved['stage']} stage, not of "
                        f"{record['stage']}; pass --resume_from_checkpoint a checkpoint this stage wrote, or start "
                        "again with --overwrite_output_dir")
    if saved["fingerprint"].get("digest") != record["fingerprint"]["digest"]:
        a, b = saved["fingerprint"].get("architecture", {}), record["fingerprint"]["architecture"]
        differ = ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise UserError(f"{checkpoint} was trained from {was} and this run loads {now}, another model ({differ}): "
                        "resume with the model it was trained from, or start again with --overwrite_output_dir")
    if was != now:
        return f"note: {checkpoint} was trained from {was}; this run loads {now}, of the same architecture"
    return None


def step_of(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])
