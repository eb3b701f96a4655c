#!/usr/bin/env python3
"""Generate a small synthetic data set in the layout of ``lvwerra/stack-exchange-paired``.

Run from anywhere (writes next to this file, in place)::

    python data/generate.py

Output: JSONL files ``finetune/train.jsonl``, ``reward/train.jsonl``, ``evaluation/train.jsonl`` and
``rl/train.jsonl`` under ``data/``. Every row has the fields ``qid`` (int), ``question``, ``date``,
``metadata`` (list of str), ``response_j`` (preferred answer) and ``response_k`` (rejected answer), plus
``pair_kind`` (how the rejected answer is bad) and ``answer_key`` (what a right answer to the question must and
must not contain; ``common/gold.py`` judges answers with it). Also ``pretrain/train.jsonl``, a corpus of
``{"text": "Question: ...\n\nAnswer: ...", "source": ...}`` documents for pretraining a tiny base model.

The generator is offline and deterministic: stdlib only, one ``random.Random(seed)``, no iteration over sets,
so re-running it with the same seed writes byte-identical files. The content is synthetic and only meant for
offline demos and tests of the training stages, not for training a useful model.

Preferred answers are specific: they restate the fix, contain a fenced code block that uses the names from the
question, and explain why. In 60% of the pairs the rejected answer looks like the preferred one (a fenced code
block, within 25% of its length) but is wrong in substance: the right fix with names that are not the question's,
the fix of another problem with the question's names, or a subtly broken variant of the fix. The other rejected
answers are vague, wrong, off-topic or dismissive and contain no code block; about a sixth of those are longer
than the preferred answer (rambling bad answer, short good answer).

The four splits share no question and no qid; beyond that, no split reuses another split's question template
filled with the same values (only the greeting and closing sentences would differ), so ``evaluation`` is held out
from ``reward`` and ``finetune``. The pretraining corpus holds no question of ``evaluation`` or ``rl``, and only
preferred answers. ``main`` checks all of this, before and after writing, and raises if violated.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.prompts import format_example, format_prompt  # noqa: E402  (stdlib only; the project's prompt template)

SEED = 20240501
SPLITS = {  # split folder -> number of rows (one row per distinct question)
    "finetune": 2000,
    "reward": 2000,
    "evaluation": 400,
    "rl": 600,
}
LONG_REJECTED_SHARE = 0.17  # target share of pairs whose rejected answer is longer than the preferred one
SHORT_GOOD_SHARE = 0.20  # share of (other) pairs whose preferred answer is the short form
MAX_PAIR_CHARS = 700  # question + answer, in characters
LOOKALIKE_SHARES = {  # share of each split's pairs whose rejected answer looks like the preferred one
    "lookalike_wrong_names": 0.20,  # the right fix with names that are not the question's
    "lookalike_wrong_fix": 0.20,    # another question's preferred answer, with this question's names
    "lookalike_broken": 0.20,       # the preferred answer with a subtly broken variant of its code
}
MIN_LOOKALIKE_SHARE = 0.5  # checked for reward and evaluation
MAX_WRONG_FIX_COVERAGE = 0.5  # a wrong-fix answer's code holds at most half of the terms of any right fix
LENGTH_TOLERANCE = 0.25  # look-alike rejected answers are within +-25% of the preferred answer's length
PRETRAIN_SPLITS = ("finetune", "reward")  # whose questions and preferred answers go into the pretraining corpus
HELD_OUT = ("evaluation", "rl")  # no question (or question core) of these is in the pretraining corpus
PRETRAIN_EXTRA = 4000  # new questions (with preferred answers) added to the pretraining corpus
QID_FIRST, QID_LAST = 1_000_000, 77_000_000  # qids are drawn from this range
DATE_FIRST = datetime.date(2009, 1, 1)
DATE_LAST = datetime.date(2023, 12, 31)

# --------------------------------------------------------------------------------------------------------
# Slots: values substituted into ``[[name]]`` placeholders. Each group is a list of alternatives; one
# alternative (a dict) is drawn per group and row, so linked values (table / foreign key) stay consistent.
# --------------------------------------------------------------------------------------------------------


def _single(name: str, values: list[str]) -> list[dict[str, str]]:
    return [{name: v} for v in values]


SLOT_GROUPS: list[list[dict[str, str]]] = [
    _single("var", ["items", "values", "records", "names", "users", "scores", "results", "entries", "prices",
                    "tokens", "orders", "rows", "ids", "words", "tags", "emails", "readings", "events"]),
    _single("file", ["data.txt", "input.log", "access.log", "words.txt", "results.csv", "server.log", "notes.md",
                     "measurements.csv", "urls.txt", "events.log", "big_dump.txt", "sensor_data.csv"]),
    _single("jsonfile", ["config.json", "settings.json", "data.json", "users.json", "state.json", "cache.json",
                         "inventory.json", "profile.json"]),
    _single("func", ["process", "handle", "parse_record", "save_row", "send_event", "validate", "transform",
                     "index_line", "load_user", "update_cache", "fetch_price", "normalize"]),
    _single("cls", ["User", "Order", "Product", "Invoice", "Customer", "Employee", "Ticket", "Book", "Account",
                    "Device"]),
    [
        {"table": "customers", "table2": "orders", "fk": "customer_id"},
        {"table": "users", "table2": "posts", "fk": "user_id"},
        {"table": "authors", "table2": "books", "fk": "author_id"},
        {"table": "departments", "table2": "employees", "fk": "department_id"},
        {"table": "products", "table2": "reviews", "fk": "product_id"},
        {"table": "teams", "table2": "players", "fk": "team_id"},
        {"table": "students", "table2": "enrollments", "fk": "student_id"},
        {"table": "projects", "table2": "tasks", "fk": "project_id"},
        {"table": "stores", "table2": "sales", "fk": "store_id"},
        {"table": "categories", "table2": "products", "fk": "category_id"},
        {"table": "courses", "table2": "lessons", "fk": "course_id"},
        {"table": "clients", "table2": "invoices", "fk": "client_id"},
        {"table": "cities", "table2": "addresses", "fk": "city_id"},
        {"table": "playlists", "table2": "songs", "fk": "playlist_id"},
        {"table": "hotels", "table2": "bookings", "fk": "hotel_id"},
    ],
    _single("col", ["name", "email", "title", "created_at", "status", "city", "username", "country"]),
    _single("branch", ["feature/login", "feature/search", "fix/typo-readme", "feature/dark-mode", "bugfix/1423",
                       "refactor-api", "dev", "experiment/cache", "feature/export-csv", "hotfix/null-check"]),
    _single("dir", ["src", "logs", "data", "build", "images", "backup", "reports", "/var/log/myapp",
                    "~/projects/site", "assets", "uploads"]),
    _single("ext", ["txt", "csv", "log", "json", "md", "py", "jpg", "png", "xml"]),
    _single("word", ["error", "TODO", "timeout", "deprecated", "hello", "admin", "banana", "quit", "yes",
                     "warning", "secret", "pending", "done", "exit", "start", "stop", "failed", "guest", "alice",
                     "cherry", "draft", "urgent", "green", "retry", "debug", "fatal", "login", "cancel"]),
    _single("url", ["/api/users", "/api/orders/42", "/api/v1/items", "/api/reports", "/api/profile",
                    "/api/invoices?page=2", "/api/v2/search", "/api/settings", "/api/cart", "/api/v1/products/7",
                    "/api/admin/stats", "/api/comments", "/api/teams/3/members", "/api/v2/export", "/api/login",
                    "/api/notifications"]),
    _single("port", ["3000", "5000", "8000", "8080", "8888", "4200", "9000", "5173", "8081", "3001"]),
    _single("pyimage", ["python:3.11-slim", "python:3.12-slim", "python:3.10", "python:3.11-alpine",
                        "python:3.12", "python:3.9-slim", "python:3.10-slim-bookworm", "python:3.13-slim"]),
    _single("pyfile", ["app.py", "main.py", "server.py", "run.py", "worker.py", "api.py", "wsgi.py", "bot.py"]),
    _single("pkg", ["requests", "numpy", "flask", "django", "pandas", "fastapi", "pytest", "scipy", "sqlalchemy",
                    "pillow", "boto3", "celery"]),
    [
        {"numkey": "price", "NumKey": "Price"},
        {"numkey": "amount", "NumKey": "Amount"},
        {"numkey": "score", "NumKey": "Score"},
        {"numkey": "quantity", "NumKey": "Quantity"},
        {"numkey": "age", "NumKey": "Age"},
        {"numkey": "salary", "NumKey": "Salary"},
    ],
    _single("key", ["name", "status", "email", "title", "owner", "theme", "version", "language"]),
    [
        {"gcol": "region", "val": "north"},
        {"gcol": "status", "val": "active"},
        {"gcol": "category", "val": "books"},
        {"gcol": "city", "val": "Berlin"},
        {"gcol": "team", "val": "red"},
        {"gcol": "country", "val": "FR"},
        {"gcol": "store", "val": "downtown"},
    ],
    _single("ncol", ["sales", "price", "duration", "score", "revenue", "age", "latency_ms", "quantity"]),
    _single("nrows", ["50", "64", "100", "200", "365", "500", "1000", "2048", "5000", "10000"]),
    _single("ncols", ["2", "3", "4", "5", "6", "7", "8", "10", "12", "16"]),
    [
        {"cvar": "a", "cvar2": "b"},
        {"cvar": "x", "cvar2": "y"},
        {"cvar": "left", "cvar2": "right"},
        {"cvar": "first", "cvar2": "second"},
        {"cvar": "m", "cvar2": "n"},
        {"cvar": "lo", "cvar2": "hi"},
        {"cvar": "i", "cvar2": "j"},
        {"cvar": "p", "cvar2": "q"},
        {"cvar": "old", "cvar2": "new_val"},
        {"cvar": "min", "cvar2": "max"},
        {"cvar": "u", "cvar2": "v"},
        {"cvar": "top", "cvar2": "bottom"},
    ],
    _single("strvar", ["s", "msg", "name", "buf", "greeting", "text", "label"]),
    _single("cssclass", ["container", "wrapper", "hero", "card-body", "modal", "header", "login-box", "panel"]),
    _single("elem", ["div", "button", "image", "form", "spinner", "heading", "logo", "login box"]),
    _single("absclass", ["badge", "close-btn", "tooltip", "ribbon", "icon", "label", "counter"]),
    _single("asset", ["app.js", "styles.css", "logo.png", "main.bundle.js", "vendor.js", "fonts/inter.woff2",
                      "hero.webp", "runtime.js", "theme.css", "icons.svg", "chunk-vendors.js", "print.css",
                      "favicon.ico", "polyfills.js"]),
    _single("server", ["nginx", "Apache", "Caddy", "Express", "S3 behind CloudFront", "a Django app"]),
    _single("script", ["deploy.sh", "backup.sh", "run_tests.sh", "build.sh", "start.sh", "cleanup.sh",
                       "sync.sh", "install.sh", "migrate.sh", "release.sh", "setup_env.sh", "rotate_logs.sh"]),
    _single("tag", ["b", "i", "em", "strong", "span", "td", "li"]),
    _single("role", ["viewer", "guest", "editor", "member", "trial", "support", "intern"]),
    _single("gofunc", ["fetchURL", "processFile", "resizeImage", "sendEmail", "crawl", "compress", "handleJob",
                       "checkHealth"]),
    _single("os", ["Ubuntu 22.04", "macOS Sonoma", "Windows 11 with WSL", "Debian 12", "Fedora 39",
                   "Ubuntu 20.04", "an M1 MacBook"]),
]

NUMERIC_SLOTS = {  # name -> (low, high), drawn with randint
    "num": (2, 500),
    "num2": (2, 500),
    "nsmall": (2, 8),
    "nworkers": (2, 64),
}

# --------------------------------------------------------------------------------------------------------
# Topics. Every text may use ``[[slot]]`` placeholders.
#   questions: Q(text, codes=indices of the code variants that answer it (default: all), whys=extra reasons)
#   intros:    first sentence of a preferred answer, true for every code variant
#   codes:     C(fence language, code, intros=variant-specific intros, whys=variant-specific reasons)
#   whys:      explanations true for every question and code variant of the topic
#   wrong:     false claims (lower-case start, full sentence) used by rejected answers
#   vague:     topic-flavoured but useless sentences used by rejected answers
# --------------------------------------------------------------------------------------------------------

TOPICS: list[dict] = []


def Q(text: str, codes: list[int] | None = None, whys: tuple[str, ...] = ()) -> dict:
    return {"text": text, "codes": codes, "whys": list(whys)}


def C(lang: str, code: str, intros: tuple[str, ...] = (), whys: tuple[str, ...] = ()) -> dict:
    return {"lang": lang, "code": code, "intros": list(intros), "whys": list(whys)}


def topic(**kw) -> None:
    kw.setdefault("site", "stackoverflow.com")
    kw["questions"] = [q if isinstance(q, dict) else Q(q) for q in kw.get("questions", [])]
    for field in ("questions", "codes", "whys", "wrong", "vague"):
        if not kw.get(field):
            raise ValueError(f"topic {kw.get('name')}: empty {field}")
    for i, code in enumerate(kw["codes"]):
        if not (kw.get("intros") or code["intros"]):
            raise ValueError(f"topic {kw['name']}: code variant {i} has no intro")
    for q in kw["questions"]:
        if q["codes"] is not None and not all(0 <= i < len(kw["codes"]) for i in q["codes"]):
            raise ValueError(f"topic {kw['name']}: bad code index in question {q['text']!r}")
    kw.setdefault("intros", [])
    TOPICS.append(kw)


topic(
    name="python-list-dedup",
    title="Python lists: removing duplicates",
    tool="Python", lang="Python", thing="removing duplicates from a list",
    questions=[
        "How do I remove duplicates from a Python list called `[[var]]` while keeping the original order?",
        "My list `[[var]]` has repeated entries, e.g. [[[num]], [[num2]], [[num]]]. What is the idiomatic way to "
        "dedupe it but keep the order of first occurrence?",
        Q("`set([[var]])` removes the duplicates but scrambles the order. How can I keep the order of `[[var]]`?",
          whys=("A `set` has no defined order, which is why `list(set([[var]]))` shuffled your items.",)),
        Q("Is there a one-liner to drop duplicate items from `[[var]]` in Python 3 without sorting the list?",
          codes=[0]),
    ],
    intros=[
        "Don't go through `set` if order matters; keep the first occurrence of each item explicitly.",
    ],
    codes=[
        C("python", "[[var]] = list(dict.fromkeys([[var]]))",
          intros=("Use `dict.fromkeys`, which keeps the first occurrence of each element in order.",
                  "You can dedupe `[[var]]` in one line with a dict, since dict keys are unique and ordered."),
          whys=("Since Python 3.7 dicts preserve insertion order, so `dict.fromkeys` keeps the first occurrence of "
                "each item.",)),
        C("python", "seen = set()\nunique = []\nfor x in [[var]]:\n    if x not in seen:\n        seen.add(x)\n"
                    "        unique.append(x)",
          intros=("Keep a `seen` set and append each item the first time you meet it.",),
          whys=("The set is only used for the fast membership test; the order comes from the list.",)),
    ],
    whys=[
        "This runs in O(n), unlike checking `x not in result` against a list, which is O(n^2).",
        "The elements must be hashable; for a list of lists convert the inner lists to tuples first.",
    ],
    wrong=[
        "`[[var]].sort(unique=True)` removes the duplicates in place and keeps the order.",
        "`set()` always keeps insertion order in Python 3, so `list(set([[var]]))` is fine.",
        "plain Python lists can't be deduplicated, you need numpy for that.",
    ],
    vague=[
        "Lists are tricky in Python, maybe use a different data structure.",
        "Duplicates usually mean the data is wrong upstream, fix that instead.",
    ],
)

topic(
    name="python-dict-sort",
    title="Python dicts: sorting by value",
    tool="Python", lang="Python", thing="sorting dictionaries",
    questions=[
        "How do I sort a dictionary `[[var]]` (about [[num]] keys) by its values in Python, highest first?",
        Q("I have a dict mapping names to counts in `[[var]]`. How can I get the top [[nsmall]] entries by count?",
          codes=[0], whys=("For just the top few, `heapq.nlargest([[nsmall]], [[var]].items(), key=lambda kv: kv[1])` "
                           "avoids sorting everything.",)),
        Q("`sorted([[var]])` only gives me the [[num]] keys. How do I sort the dict `[[var]]` by value and keep the "
          "pairs?",
          whys=("Iterating over a dict yields its keys, which is why `sorted([[var]])` lost the values.",)),
        "What's the cleanest way to order the items of `[[var]]` by value so I can print a ranking of the top "
        "[[nsmall]]?",
    ],
    intros=[
        "Sort the `(key, value)` pairs with a `key` function that picks the value.",
        "Use `sorted` on `[[var]].items()` and tell it to compare the second element of each pair.",
    ],
    codes=[
        C("python", "ranking = sorted([[var]].items(), key=lambda kv: kv[1], reverse=True)\n"
                    "for key, value in ranking[:[[nsmall]]]:\n    print(key, value)"),
        C("python", "from operator import itemgetter\n\n"
                    "by_value = dict(sorted([[var]].items(), key=itemgetter(1), reverse=True))",
          whys=("Wrapping the result in `dict(...)` keeps the order because dicts preserve insertion order since "
                "3.7.",
                "`operator.itemgetter(1)` is a slightly faster equivalent of `lambda kv: kv[1]`.")),
    ],
    whys=[
        "`sorted` returns a new list of `(key, value)` tuples; the `key` function decides what is compared.",
        "`reverse=True` puts the largest values first.",
    ],
    wrong=[
        "dictionaries can't be sorted at all in Python, you have to switch to a list of lists.",
        "`[[var]].sort()` sorts a dict by value in place.",
        "`sorted([[var]])` already sorts by value, you just have to print it twice.",
    ],
    vague=[
        "Sorting dicts is a common question, there are several approaches depending on what you need.",
        "Maybe a database would be better if you need ordering.",
    ],
)

topic(
    name="python-file-lines",
    title="Python: reading a file line by line",
    tool="Python", lang="Python", thing="reading files",
    questions=[
        "What's the right way to read `[[file]]` (about [[num]] MB) line by line in Python without loading the whole "
        "file into memory?",
        "My script calls `open('[[file]]').read()` and runs out of memory because the file is [[nsmall]] GB. "
        "How do I process it one line at a time?",
        "How do I iterate over the lines of `[[file]]` and call `[[func]]()` on each one, "
        "without the trailing newline?",
        Q("Reading `[[file]]` with `readlines()` is slow and uses [[nsmall]] GB of RAM. Is there a better pattern?",
          whys=("`readlines()` builds a list of every line first, which is exactly what uses the memory.",)),
    ],
    intros=[
        "Iterate over the file object itself inside a `with` block.",
        "A file object is already a lazy iterator over lines, so just loop over it.",
        "Avoid `read()` and `readlines()` for big files; loop over the open file instead.",
    ],
    codes=[
        C("python", "with open(\"[[file]]\", encoding=\"utf-8\") as f:\n    for line in f:\n"
                    "        line = line.rstrip(\"\\n\")\n        [[func]](line)",
          whys=("`rstrip(\"\\n\")` removes the newline that every line keeps, without touching other whitespace.",)),
        C("python", "with open(\"[[file]]\", encoding=\"utf-8\") as f:\n"
                    "    for lineno, line in enumerate(f, start=1):\n        [[func]](line.rstrip(\"\\n\"))",
          whys=("`enumerate(f, start=1)` gives you line numbers for error messages at no extra cost.",)),
    ],
    whys=[
        "Iterating over the file yields one line at a time, so memory use stays constant even for huge files.",
        "The `with` block closes the file even if `[[func]]` raises an exception.",
    ],
    wrong=[
        "`f.readlines()` is lazy and streams the file, so memory is not a concern.",
        "files are only closed if you call `del f`; `with` does nothing special.",
        "Python can't read files bigger than your RAM, split the file with another tool first.",
    ],
    vague=[
        "Files can be read in many ways in Python, pick whichever one you like.",
        "Maybe your machine just needs more memory.",
    ],
)

topic(
    name="python-exceptions",
    title="Python: catching several exceptions",
    tool="Python", lang="Python", thing="exception handling",
    questions=[
        "How can I catch both `ValueError` and `KeyError` in one `except` clause when calling `[[func]]([[var]])`?",
        Q("I wrote `except ValueError or KeyError:` around `[[func]]([[var]])` but the KeyError is not caught. Why?",
          whys=("`ValueError or KeyError` is a normal boolean expression that evaluates to `ValueError`, which is "
                "why only ValueError was caught.",)),
        "Is it possible to handle two exception types the same way in Python without duplicating the except block "
        "when calling `[[func]]` on `[[var]]`?",
        Q("What's the right way to log the error and continue when `[[func]](item)` raises either a ValueError or a "
          "KeyError for some item of `[[var]]`?", codes=[1]),
    ],
    intros=[
        "Pass a tuple of exception classes to `except`.",
        "`except` accepts a tuple, so you can list both exception types in one clause.",
    ],
    codes=[
        C("python", "try:\n    result = [[func]]([[var]])\nexcept (ValueError, KeyError) as exc:\n"
                    "    logger.warning(\"[[func]] failed: %s\", exc)\n    result = None"),
        C("python", "for item in [[var]]:\n    try:\n        [[func]](item)\n"
                    "    except (ValueError, KeyError) as exc:\n        print(f\"skipping {item!r}: {exc}\")\n"
                    "        continue",
          whys=("`continue` moves on to the next item, so one bad record doesn't stop the loop.",)),
    ],
    whys=[
        "`as exc` binds whichever exception was raised, so you can log its message.",
        "Avoid a bare `except:`, because it also swallows `KeyboardInterrupt` and `SystemExit`.",
        "Keep the `try` block small so you don't accidentally hide bugs in unrelated lines.",
    ],
    wrong=[
        "`except ValueError or KeyError:` catches both, your KeyError must come from somewhere else.",
        "Python can only catch one exception type per try block, so you need nested try statements.",
        "you should use `except Exception: pass` everywhere, that's the standard pattern.",
    ],
    vague=[
        "Exceptions are a complex topic, I'd read a book about error handling.",
        "Just make sure the errors don't happen in the first place.",
    ],
)

topic(
    name="python-venv",
    title="Python virtual environments",
    tool="pip", lang="Python", thing="virtual environments",
    questions=[
        Q("pip installs `[[pkg]]` globally and breaks my other projects. How do I set up an isolated environment "
          "for the project in `[[dir]]`?", codes=[0]),
        "How do I create a Python virtual environment for my project in `[[dir]]` and install `[[pkg]]` into it "
        "only?",
        Q("`pip install [[pkg]]` fails with a permission error unless I use sudo. What is the proper way to install "
          "packages for one project on [[os]]?",
          whys=("Running pip with sudo can overwrite files your OS package manager owns, which is why it breaks "
                "things.",)),
        "What's the standard way to keep each Python project's dependencies (like `[[pkg]]`) separate on [[os]]?",
    ],
    intros=[
        "Create a virtual environment with the built-in `venv` module and install into it.",
        "Use a per-project virtual environment instead of the system Python.",
    ],
    codes=[
        C("bash", "cd [[dir]]\npython3 -m venv .venv\nsource .venv/bin/activate\npip install [[pkg]]\n"
                  "pip freeze > requirements.txt",
          whys=("Commit `requirements.txt`, not the `.venv` folder, and recreate the env with "
                "`pip install -r requirements.txt`.",)),
        C("bash", "python3 -m venv .venv\n. .venv/bin/activate\npython -m pip install --upgrade pip\n"
                  "python -m pip install [[pkg]]",
          whys=("`python -m pip` guarantees you use the pip that belongs to the active interpreter.",)),
    ],
    whys=[
        "`venv` creates a private interpreter and `site-packages`, so installs never touch the system Python.",
        "After `activate`, `python` and `pip` point into `.venv`; run `deactivate` to leave it.",
    ],
    wrong=[
        "use `sudo pip install [[pkg]]` so the package ends up in the right place for every project.",
        "virtual environments only work on Windows.",
        "you need to install a second copy of Python for each project by hand, there is no tool for it.",
    ],
    vague=[
        "Python packaging is a mess, everyone has a different opinion.",
        "Try a different package manager, maybe that helps.",
    ],
)

topic(
    name="python-mutable-default",
    title="Python: mutable default arguments",
    tool="Python", lang="Python", thing="default arguments",
    questions=[
        Q("Why does my function `def add_item(item, [[var]]=[])` keep the items from previous calls? After "
          "[[nsmall]] calls it holds [[nsmall]] items.", codes=[0]),
        Q("Calling `add_item([[num]])` twice returns a list with two elements. The default `[[var]]=[]` should be "
          "empty each time, right?", codes=[0]),
        Q("My default argument list `[[var]]` seems to be shared between calls of `[[func]]`. Is this a Python bug?",
          codes=[1]),
        Q("How do I give `[[func]]` a default empty list argument `[[var]]` that doesn't remember old values?",
          codes=[1]),
    ],
    intros=[
        "Use `None` as the default and create the list inside the function.",
        "This is the classic mutable default argument gotcha, not a bug.",
        "The default list is created once, so replace it with a `None` sentinel.",
    ],
    codes=[
        C("python", "def add_item(item, [[var]]=None):\n    if [[var]] is None:\n        [[var]] = []\n"
                    "    [[var]].append(item)\n    return [[var]]"),
        C("python", "def [[func]](value, [[var]]=None):\n    [[var]] = [] if [[var]] is None else [[var]]\n"
                    "    [[var]].append(value)\n    return [[var]]"),
    ],
    whys=[
        "Default values are evaluated once, when the `def` statement runs, so every call shares the same list.",
        "Using `None` as a sentinel creates a fresh list on every call that doesn't pass one.",
        "The same applies to dicts and sets used as defaults.",
    ],
    wrong=[
        "it's a garbage collector bug, call `gc.collect()` between calls.",
        "lists are copied on every function call in Python, so something else must be modifying `[[var]]`.",
        "you need to declare `[[var]]` as `global` inside the function.",
    ],
    vague=[
        "Functions with lists are confusing, maybe use a class instead.",
        "I'd restructure the whole program, this design seems off.",
    ],
)

topic(
    name="python-json",
    title="Python: reading and writing JSON",
    tool="Python", lang="Python", thing="working with JSON",
    questions=[
        "How do I load `[[jsonfile]]` into a Python dict, change the `[[key]]` field and write it back nicely "
        "indented?",
        Q("`json.loads(open('[[jsonfile]]'))` raises a TypeError. What's the right way to read a JSON file? I need "
          "its `[[key]]` field.",
          whys=("`json.loads` expects a `str` or `bytes`, not a file object, which explains the TypeError.",)),
        "When I save my dict to `[[jsonfile]]` after changing `[[key]]`, everything ends up on one line and "
        "accents become `\\u00e9`. How do I fix that?",
        "What is the difference between `json.load` and `json.loads`? I want to update `[[key]]` in `[[jsonfile]]`.",
    ],
    intros=[
        "Read with the json module, change the dict, and write it back with `indent`.",
        "`json.load` takes a file, `json.loads` takes a string; use the pair that matches what you have.",
    ],
    codes=[
        C("python", "import json\n\nwith open(\"[[jsonfile]]\", encoding=\"utf-8\") as f:\n"
                    "    [[var]] = json.load(f)\n\n"
                    "[[var]][\"[[key]]\"] = \"updated\"\n\n"
                    "with open(\"[[jsonfile]]\", \"w\", encoding=\"utf-8\") as f:\n"
                    "    json.dump([[var]], f, indent=2, ensure_ascii=False)",
          intros=("Use `json.load` with a file object to read and `json.dump` with `indent` to write.",)),
        C("python", "import json\nfrom pathlib import Path\n\npath = Path(\"[[jsonfile]]\")\n"
                    "data = json.loads(path.read_text(encoding=\"utf-8\"))\ndata[\"[[key]]\"] = \"updated\"\n"
                    "path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding=\"utf-8\")",
          intros=("Read the text with `pathlib` and parse it with `json.loads`; `json.dumps` does the reverse.",)),
    ],
    whys=[
        "`json.load`/`json.dump` work with file objects, `json.loads`/`json.dumps` with strings.",
        "`indent=2` pretty-prints the output, and `ensure_ascii=False` keeps non-ASCII characters readable.",
    ],
    wrong=[
        "use `eval(open('[[jsonfile]]').read())`, it's the same as parsing JSON and faster.",
        "JSON files can only be read with the `pickle` module.",
        "`json.loads` and `json.load` are aliases, the TypeError must be a broken install.",
    ],
    vague=[
        "JSON is just text, you can handle it however you want.",
        "Maybe use YAML instead, it's nicer.",
    ],
)

topic(
    name="git-squash-rebase",
    title="git: squashing commits with interactive rebase",
    tool="git", lang="git", thing="rebasing",
    questions=[
        "I have [[nsmall]] small commits on `[[branch]]` and want to squash them into one before opening a pull "
        "request. How?",
        "How do I combine my last [[nsmall]] commits into a single commit with git? They are already pushed to "
        "`[[branch]]`.",
        "Reviewers asked me to clean up the history of `[[branch]]` (lots of 'fix typo' commits). What's the "
        "usual way to squash the last [[nsmall]] of them?",
        Q("What does `git rebase -i` do and how do I use it to merge the last [[nsmall]] commits on `[[branch]]`?",
          codes=[0]),
    ],
    intros=["Squash them locally, then force-push the branch safely."],
    codes=[
        C("bash", "git checkout [[branch]]\ngit rebase -i HEAD~[[nsmall]]\n"
                  "# in the editor change \"pick\" to \"squash\" for every commit except the first\n"
                  "git push --force-with-lease origin [[branch]]",
          intros=("Use an interactive rebase over the last [[nsmall]] commits and mark all but the first as "
                  "`squash`.",
                  "`git rebase -i` lets you rewrite the last few commits, including squashing them."),
          whys=("`squash` folds a commit into the one above it and lets you edit the combined message.",)),
        C("bash", "git checkout [[branch]]\ngit reset --soft HEAD~[[nsmall]]\n"
                  "git commit -m \"Add [[branch]] feature\"\n"
                  "git push --force-with-lease",
          intros=("The quickest way is a soft reset to before those commits, followed by one new commit.",),
          whys=("`git reset --soft` moves the branch back but keeps all the changes staged, so the new commit "
                "contains all of them.",)),
    ],
    whys=[
        "Because the history changed, a normal push is rejected; `--force-with-lease` overwrites the remote branch "
        "but refuses if someone else pushed in the meantime.",
        "Only rewrite branches nobody else has based work on.",
    ],
    wrong=[
        "you can't squash commits once they are pushed; delete the repository and start over.",
        "`git merge --squash [[branch]]` rewrites the commits that are already on the remote branch.",
        "`git commit --amend` squashes all commits on the branch at once.",
    ],
    vague=[
        "Git history doesn't really matter, reviewers shouldn't care about it.",
        "Git is confusing, maybe use a GUI client.",
    ],
)

topic(
    name="git-undo-commit",
    title="git: undoing the last commit",
    tool="git", lang="git", thing="undoing commits",
    questions=[
        "I committed to `[[branch]]` by mistake and haven't pushed yet. How do I undo the last commit but keep my "
        "changes to `[[file]]`?",
        "How do I undo `git commit` without losing my work? The commit only touched `[[file]]` and isn't pushed to "
        "`[[branch]]` yet.",
        "I accidentally committed `[[file]]` with a debug print on `[[branch]]`. Can I take the commit back? "
        "It's still local.",
        Q("What's the difference between `git reset --soft`, `--mixed` and `--hard` when undoing my last commit on "
          "`[[branch]]`?",
          whys=("`--hard` also resets the working tree, so it throws your changes away.",)),
    ],
    intros=["Since it's not pushed, just move the branch pointer back one commit."],
    codes=[
        C("bash", "git reset --soft HEAD~1\ngit status   # [[file]] is still staged",
          intros=("Use `git reset --soft HEAD~1`, which undoes the commit and keeps your changes staged.",),
          whys=("`--soft` moves the branch pointer but leaves the index and working tree alone, so nothing is lost.",)),
        C("bash", "git reset HEAD~1          # --mixed: changes kept, unstaged\ngit diff [[file]]\n"
                  "git add -p [[file]] && git commit",
          intros=("Use a plain `git reset HEAD~1`, which keeps your edits but unstages them.",),
          whys=("`--mixed` (the default) keeps the working tree, so you can re-add just the parts you want.",)),
    ],
    whys=[
        "If the commit was already pushed, prefer `git revert HEAD`, which adds a new commit instead of rewriting "
        "history.",
        "Even after a bad reset, `git reflog` shows the old commit so you can get it back.",
    ],
    wrong=[
        "`git reset --hard HEAD~1` is the safe way, it keeps all your edits.",
        "`git checkout HEAD~1` deletes the last commit.",
        "commits are permanent in git, there is no way to undo them.",
    ],
    vague=[
        "Everyone commits mistakes, I wouldn't worry about it.",
        "Just be more careful next time before committing.",
    ],
)

topic(
    name="git-merge-conflict",
    title="git: resolving merge conflicts",
    tool="git", lang="git", thing="merge conflicts",
    questions=[
        "Merging `[[branch]]` into main gives `CONFLICT (content): Merge conflict in [[file]]`. What do I do now?",
        Q("How do I resolve a merge conflict in `[[file]]` after merging `[[branch]]`? I see lines with `<<<<<<<` "
          "and `>>>>>>>` in it.",
          codes=[0]),
        "git says 'Automatic merge failed; fix conflicts and then commit the result' after merging `[[branch]]`. "
        "Only `[[file]]` is affected. What are the steps?",
        Q("I'm in the middle of merging `[[branch]]` with a conflict in `[[file]]` and want to either finish it or "
          "cancel it. How?",
          whys=("`git merge --abort` returns to the state before the merge if you want to cancel.",)),
    ],
    intros=["Git stopped so you can choose which lines to keep; mark the file resolved when done."],
    codes=[
        C("bash", "git status                 # lists conflicted files\n"
                  "# edit [[file]]: keep the right lines, delete the <<<<<<< ======= >>>>>>> markers\n"
                  "git add [[file]]\ngit commit                 # concludes the merge",
          intros=("Edit the conflicted file, remove the markers, then `git add` and commit.",),
          whys=("Between `<<<<<<<` and `=======` is your side (HEAD); between `=======` and `>>>>>>>` is the "
                "incoming branch.",)),
        C("bash", "git checkout --theirs [[file]]   # or --ours to keep your side\ngit add [[file]]\n"
                  "git commit\n# to cancel instead:\ngit merge --abort",
          intros=("If one side should win completely, check out that version of the file and mark it resolved.",),
          whys=("`--theirs` takes the version from `[[branch]]`, `--ours` the one from your current branch.",)),
    ],
    whys=[
        "`git add` marks the file as resolved, and the merge only finishes when you commit.",
        "`git status` lists every file that still has conflicts.",
    ],
    wrong=[
        "conflicts mean the repository is corrupted; run `git fsck --repair`.",
        "delete the `.git` folder and clone again, conflicts can't be fixed in place.",
        "`git push --force` resolves conflicts automatically.",
    ],
    vague=[
        "Merge conflicts happen, you need to coordinate better with your team.",
        "Try to avoid merging, it always causes trouble.",
    ],
)

topic(
    name="sql-left-join",
    title="SQL: LEFT JOIN vs INNER JOIN",
    tool="your database", lang="SQL", thing="SQL joins",
    questions=[
        "I want every row (with its `[[col]]`) from `[[table]]` even when there is no matching row in `[[table2]]`. "
        "My INNER JOIN drops them. What join do I need?",
        Q("How do I list all [[num]] [[table]] with the number of their [[table2]], including [[table]] that have "
          "none?", codes=[1]),
        "My query joining `[[table]]` and `[[table2]]` on `[[fk]]` returns fewer rows than the [[num]] that "
        "`[[table]]` has. Why?",
        "What's the difference between INNER JOIN and LEFT JOIN? I need all [[table]] rows and their `[[col]]`, "
        "even without [[table2]].",
    ],
    intros=[
        "Use a `LEFT JOIN` from `[[table]]` to `[[table2]]`.",
        "You need an outer join: `LEFT JOIN` keeps every row from the left table.",
    ],
    codes=[
        C("sql", "SELECT t.id, t.[[col]], o.id AS match_id\nFROM [[table]] AS t\nLEFT JOIN [[table2]] AS o\n"
                 "  ON o.[[fk]] = t.id;",
          whys=("Columns from `[[table2]]` are NULL for rows without a match.",)),
        C("sql", "SELECT t.id, COUNT(o.id) AS n_[[table2]]\nFROM [[table]] t\n"
                 "LEFT JOIN [[table2]] o ON o.[[fk]] = t.id\n"
                 "GROUP BY t.id;",
          whys=("`COUNT(o.id)` counts only matched rows, so [[table]] without [[table2]] get 0.",)),
    ],
    whys=[
        "An INNER JOIN only returns rows that match on both sides, so unmatched rows are dropped.",
        "A condition on `[[table2]]` in the WHERE clause turns it back into an inner join; put it in the ON clause.",
    ],
    wrong=[
        "INNER JOIN and LEFT JOIN are synonyms in every database.",
        "use `RIGHT JOIN` with the same table order, it keeps all rows of `[[table]]`.",
        "joins can't return rows without a match, you need two separate queries and merge them in code.",
    ],
    vague=[
        "SQL joins are confusing, look at a Venn diagram.",
        "Maybe denormalize the tables so you don't need joins.",
    ],
)

topic(
    name="sql-group-having",
    title="SQL: GROUP BY with HAVING",
    tool="your database", lang="SQL", thing="aggregating in SQL",
    questions=[
        "How do I find [[table]] that have more than [[nsmall]] rows in `[[table2]]`? `WHERE COUNT(*) > [[nsmall]]` "
        "gives an error.",
        "Why can't I use an aggregate function like COUNT in a WHERE clause? I want [[fk]] values that occur more "
        "than [[nsmall]] times.",
        "How do I filter groups after GROUP BY in SQL, e.g. only [[fk]] with more than [[nsmall]] [[table2]]?",
        "My query `SELECT [[fk]], COUNT(*) FROM [[table2]] WHERE COUNT(*) > [[nsmall]]` fails. What's the right "
        "syntax?",
    ],
    intros=[
        "Filter the groups with `HAVING`, not `WHERE`.",
        "Aggregates are filtered with `HAVING`, which runs after `GROUP BY`.",
        "Move the condition on `COUNT(*)` into a `HAVING` clause.",
    ],
    codes=[
        C("sql", "SELECT [[fk]], COUNT(*) AS n\nFROM [[table2]]\nGROUP BY [[fk]]\nHAVING COUNT(*) > [[nsmall]];"),
        C("sql", "SELECT [[fk]], COUNT(*) AS n\nFROM [[table2]]\nWHERE [[col]] IS NOT NULL\nGROUP BY [[fk]]\n"
                 "HAVING COUNT(*) > [[nsmall]]\nORDER BY n DESC;",
          whys=("You can combine both: `WHERE` drops rows early, `HAVING` applies conditions on the aggregates.",)),
    ],
    whys=[
        "`WHERE` filters rows before grouping, so aggregates don't exist yet; `HAVING` filters groups afterwards.",
        "Every selected column must be in `GROUP BY` or inside an aggregate function.",
    ],
    wrong=[
        "aggregates work in WHERE if you wrap them in extra parentheses.",
        "you need a stored procedure to count rows per group.",
        "`HAVING` is only supported in Oracle.",
    ],
    vague=[
        "SQL is a declarative language, just describe what you want.",
        "Do the counting in your application code, databases are slow at that.",
    ],
)

topic(
    name="sql-parameterized",
    title="SQL injection and parameterized queries",
    tool="your database driver", lang="SQL", thing="building SQL queries",
    questions=[
        "I build my query with an f-string: `f\"SELECT * FROM [[table]] WHERE [[col]] = '{value}'\"`. Someone said "
        "this is unsafe. How should I do it?",
        Q("My query on `[[table]]` breaks when the `[[col]]` value contains an apostrophe, like O'Brien. How do I "
          "pass user input to sqlite3 safely?",
          whys=("This also fixes the O'Brien case, because no manual quoting is involved.",)),
        "How do I prevent SQL injection when querying the `[[table]]` table by `[[col]]` from Python?",
        "Is string concatenation OK for building `SELECT ... FROM [[table]] WHERE [[col]] = ...` queries in Python?",
    ],
    intros=[
        "Use a parameterized query and pass the value separately.",
        "Never format user input into SQL; let the driver bind it as a parameter.",
    ],
    codes=[
        C("python", "cur.execute(\n    \"SELECT * FROM [[table]] WHERE [[col]] = ?\",\n    (value,),\n)\n"
                    "rows = cur.fetchall()"),
        C("python", "import sqlite3\n\nconn = sqlite3.connect(\"app.db\")\nrows = conn.execute(\n"
                    "    \"SELECT id, [[col]] FROM [[table]] WHERE [[col]] = ? LIMIT ?\",\n    (value, [[num]]),\n"
                    ").fetchall()",
          whys=("Each `?` gets the next value from the tuple, in order.",)),
    ],
    whys=[
        "With a placeholder the driver sends the value separately from the SQL text, so a quote in the input can't "
        "change the query.",
        "The placeholder style depends on the driver: `?` for sqlite3, `%s` for psycopg2 and mysqlclient.",
        "Table and column names can't be parameters; whitelist those in your code.",
    ],
    wrong=[
        "escaping quotes with `value.replace(\"'\", \"\")` makes f-strings completely safe.",
        "SQL injection only affects PHP, Python drivers are immune.",
        "using `.format()` instead of an f-string prevents injection.",
    ],
    vague=[
        "Security is hard, maybe hire a consultant.",
        "Just validate the input somehow and it should be fine.",
    ],
)

topic(
    name="regex-findall-numbers",
    title="Regex: extracting numbers",
    tool="Python", lang="regex", thing="regular expressions",
    questions=[
        Q("How do I pull all the numbers out of a string like `\"[[word]] [[num]] at line [[num2]]\"` using a regex "
          "in Python?", codes=[0]),
        Q("`re.match(r'\\d+', line)` returns None for `\"[[word]]: [[num]] items\"`. How do I find the numbers "
          "anywhere in the string?",
          whys=("`re.match` only matches at the beginning of the string, which is why it returned None; "
                "`re.search` finds the first match anywhere.",)),
        Q("I need every integer from lines like `[[word]] [[num]]/[[num2]]` in `[[file]]` as a list of ints. "
          "Which regex function should I use?", codes=[1]),
        Q("What's the difference between `re.match`, `re.search` and `re.findall` for extracting digits?",
          whys=("`re.match` anchors at the start, `re.search` returns the first match anywhere, and `re.findall` "
                "returns all of them.",)),
    ],
    intros=[
        "Use `re.findall` with `\\d+` and convert the matches to `int`.",
        "A single `re.findall` call gives you all the numbers as strings.",
    ],
    codes=[
        C("python", "import re\n\ntext = \"[[word]] [[num]] at line [[num2]]\"\n"
                    "numbers = [int(n) for n in re.findall(r\"\\d+\", text)]\nprint(numbers)  # [[[num]], [[num2]]]"),
        C("python", "import re\n\nNUM = re.compile(r\"-?\\d+\")\nwith open(\"[[file]]\") as f:\n"
                    "    for line in f:\n        print([int(n) for n in NUM.findall(line)])",
          whys=("Compiling the pattern once with `re.compile` avoids re-parsing it for every line.",)),
    ],
    whys=[
        "`\\d+` matches one or more digits, and `findall` returns all non-overlapping matches.",
        "Use a raw string (`r\"...\"`) so the backslash reaches the regex engine unchanged.",
        "For decimals use `-?\\d+(?:\\.\\d+)?`; the `(?:...)` group keeps `findall` returning whole matches.",
    ],
    wrong=[
        "`re.match` scans the whole string and returns all matches as a list.",
        "regex can't match digits, loop over the characters and call `isdigit` instead.",
        "`\\d` only matches the digit zero.",
    ],
    vague=[
        "Regex is write-only code, try to avoid it.",
        "Some people, when confronted with a problem, think 'I know, I'll use regular expressions'.",
    ],
)

topic(
    name="regex-greedy-lazy",
    title="Regex: greedy vs lazy quantifiers",
    tool="Python", lang="regex", thing="regular expressions",
    questions=[
        Q("My regex `<.*>` on `<[[tag]]>[[word]]</[[tag]]>` matches the whole string instead of just `<[[tag]]>`. "
          "Why?", codes=[0]),
        Q("How do I make `.*` stop at the first `\"` instead of the last one? I'm extracting quoted values like "
          "`[[key]]=\"[[word]]\"` from a line.", codes=[2]),
        "What's the difference between `.*` and `.*?` in a regular expression? I'm parsing lines of `[[file]]`.",
        Q("Extracting the text between `[` and `]` in `[[[word]]] and [[[key]]]` gives me one big match. How do I "
          "get both?", codes=[1]),
    ],
    intros=["Your quantifier is greedy, so the match runs to the last possible delimiter."],
    codes=[
        C("python", "import re\n\nre.findall(r\"<.*?>\", \"<[[tag]]>[[word]]</[[tag]]>\")\n"
                    "# ['<[[tag]]>', '</[[tag]]>']",
          intros=("Make the quantifier lazy with `.*?` so the match ends at the first `>`.",),
          whys=("For real HTML, use a parser such as BeautifulSoup instead of regexes.",
                "`<[^>]*>` also works: the negated class can't cross a `>`, and it avoids backtracking.")),
        C("python", "import re\n\ntext = '[[[word]]] and [[[key]]]'\nprint(re.findall(r\"\\[([^\\]]*)\\]\", text))\n"
                    "# ['[[word]]', '[[key]]']",
          intros=("Use a negated character class so a match can't run past the first `]`.",),
          whys=("`[^\\]]*` can't cross a closing bracket, so each match stops at the first `]`.",
                "With one capture group, `findall` returns just the group, without the brackets.")),
        C("python", "import re\n\nline = 'key=\"[[word]]\" other=\"[[key]]\"'\nprint(re.findall(r'\"(.*?)\"', line))\n"
                    "# ['[[word]]', '[[key]]']",
          intros=("Make the quantifier lazy with `.*?` so each match ends at the next quote.",),
          whys=("`\"([^\"]*)\"` is an equivalent pattern that can't run past a closing quote.",)),
    ],
    whys=[
        "A greedy `.*` grabs as much as possible and then backtracks, so it ends at the last delimiter.",
        "`*?` is the lazy version: it stops at the first place where the rest of the pattern matches.",
    ],
    wrong=[
        "`.` never matches `>` or quotes, so your regex is fine and this is a bug in Python.",
        "greedy and lazy quantifiers behave the same in Python; only Perl has lazy ones.",
        "you need the `re.DOTALL` flag to make `.*` stop at the first match.",
    ],
    vague=[
        "Regex engines all behave differently, try an online tester.",
        "Just use string split, regex is overkill.",
    ],
)

topic(
    name="bash-loop-files",
    title="bash: looping over files",
    tool="bash", lang="bash", thing="shell scripting", site="unix.stackexchange.com",
    questions=[
        "How do I loop over all `.[[ext]]` files in `[[dir]]` in bash and run a command on each? Some names contain "
        "spaces.",
        Q("My loop `for f in $(ls [[dir]]/*.[[ext]])` breaks on file names with spaces. What's the right way?",
          whys=("`$(ls ...)` output is split on whitespace, which is why names with spaces broke.",)),
        "In a bash script, how can I process every `*.[[ext]]` file in `[[dir]]` and skip it if there are none?",
        "What's the safest way to iterate over the `.[[ext]]` files in `[[dir]]` in a shell script?",
    ],
    intros=[
        "Loop over a glob directly and quote the variable.",
        "Don't parse `ls`; let the shell expand the glob.",
        "Use a `for` loop over `[[dir]]/*.[[ext]]` and always quote `\"$f\"`.",
    ],
    codes=[
        C("bash", "for f in [[dir]]/*.[[ext]]; do\n    [ -e \"$f\" ] || continue\n    echo \"processing $f\"\n"
                  "    wc -l \"$f\"\ndone",
          whys=("Without `nullglob` an unmatched pattern stays literal; the `[ -e ]` check skips it.",)),
        C("bash", "shopt -s nullglob\nfor f in [[dir]]/*.[[ext]]; do\n    cp -- \"$f\" \"$f.bak\"\ndone",
          whys=("`shopt -s nullglob` makes a pattern with no matches expand to nothing, so the loop body never runs.",
                "`--` stops option parsing, so a file named `-rf` is treated as a name.")),
    ],
    whys=[
        "The glob expands to file names directly, so spaces are preserved as long as you quote `\"$f\"`.",
        "Parsing `ls` output breaks on spaces, newlines and glob characters in names.",
    ],
    wrong=[
        "`for f in $(ls [[dir]])` is the safest way because `ls` escapes spaces.",
        "bash can't handle spaces in file names, rename the files first.",
        "you have to use `while true` and `sleep` to loop over files.",
    ],
    vague=[
        "Shell scripting is painful, use a real language.",
        "Avoid spaces in file names, it's bad practice anyway.",
    ],
)

topic(
    name="bash-quoting-test",
    title="bash: quoting variables in tests",
    tool="bash", lang="bash", thing="bash conditionals", site="unix.stackexchange.com",
    questions=[
        Q("My bash `if [ $[[strvar]] == \"[[word]]\" ]` fails with `unary operator expected` when the variable is "
          "empty. How do I fix it?", codes=[0],
          whys=("Unquoted, an empty variable disappears and `[` sees `[ == [[word]] ]`, hence `unary operator "
                "expected`.",)),
        Q("Why does `[ $[[strvar]] = [[word]] ]` give `too many arguments` when the variable contains spaces?",
          codes=[1], whys=("With spaces, the unquoted value is split into several words, hence `too many "
                           "arguments`.",)),
        "What's the correct way to compare a string variable like `$[[strvar]]` with \"[[word]]\" in a bash if "
        "statement?",
        Q("In `[[script]]`, `[ -n $[[strvar]] ]` is true even when `[[strvar]]` is empty. When should I quote "
          "variables in bash?", codes=[1],
          whys=("With the variable gone, `[ -n ]` is a one-argument test of the non-empty string `-n`, so it is "
                "always true.",)),
    ],
    intros=[
        "Quote the variable: `\"$[[strvar]]\"`.",
        "The problem is word splitting of the unquoted variable.",
        "Always double-quote expansions inside `[ ]`.",
    ],
    codes=[
        C("bash", "if [ \"$[[strvar]]\" = \"[[word]]\" ]; then\n    echo \"match\"\nfi"),
        C("bash", "if [ -z \"$[[strvar]]\" ]; then\n    echo \"empty\"\nelif [ \"$[[strvar]]\" = \"[[word]]\" ]; then\n"
                  "    echo \"match\"\nfi",
          whys=("`-z` and `-n` test for an empty or non-empty string, and they only work reliably when the variable "
                "is quoted.",)),
    ],
    whys=[
        "Quoting keeps the value a single word, even when it is empty or contains spaces.",
        "`=` is the portable string comparison inside `[ ]`; `-eq` is for integers.",
        "`[[ ]]` is a bash keyword that doesn't word-split, but quoting is still a good habit.",
    ],
    wrong=[
        "you need to `export` the variable first, otherwise `if` can't see it.",
        "use `-eq` for string comparison in bash.",
        "bash doesn't support string comparison, call Python from the script.",
    ],
    vague=[
        "Bash syntax is weird, I always look it up.",
        "Try adding some spaces in different places.",
    ],
)

topic(
    name="grep-recursive",
    title="grep: searching files recursively",
    tool="grep", lang="bash", thing="searching files", site="unix.stackexchange.com",
    questions=[
        "How can I search for the string `[[word]]` in all files under `[[dir]]` and only print the file names?",
        "Which command finds every `.[[ext]]` file below `[[dir]]` that contains `[[word]]`?",
        Q("I need to list the files in `[[dir]]` (recursively) that mention `[[word]]`, ignoring case. How?",
          codes=[1]),
        Q("Is there a grep option to search subdirectories? `grep [[word]] [[dir]]` says it is a directory.",
          whys=("Without `-r`, grep treats `[[dir]]` as a file and refuses to read it.",)),
    ],
    intros=[
        "Use `grep -r` to recurse and `-l` to print only file names.",
        "grep can recurse itself with `-r`; add `-l` for names only.",
    ],
    codes=[
        C("bash", "grep -rl \"[[word]]\" [[dir]]/\n# only .[[ext]] files:\n"
                  "grep -rl --include=\"*.[[ext]]\" \"[[word]]\" [[dir]]/",
          whys=("`--include` restricts the search to file names matching the glob.",)),
        C("bash", "grep -rli \"[[word]]\" [[dir]]/\n# with find, if you need more filters:\n"
                  "find [[dir]] -name '*.[[ext]]' -exec grep -li \"[[word]]\" {} +",
          whys=("`-i` makes the search case-insensitive.",
                "`-exec ... {} +` passes many files to one grep call, which is much faster than `\\;`.")),
    ],
    whys=[
        "`-r` recurses into directories and `-l` prints the name of each file with a match, once.",
        "Add `-w` to match whole words only.",
    ],
    wrong=[
        "grep doesn't recurse, so you need a Python script for this.",
        "`grep -v [[word]]` lists the files that contain the match.",
        "`find` can search file contents with `-name \"[[word]]\"`.",
    ],
    vague=[
        "Use your IDE's search, it's easier.",
        "There are many search tools, try a few.",
    ],
)

topic(
    name="linux-chmod",
    title="Linux: Permission denied running a script",
    tool="your shell", lang="bash", thing="file permissions", site="unix.stackexchange.com",
    questions=[
        "Running `./[[script]]` in `[[dir]]` gives `Permission denied`. How do I make it executable?",
        "I wrote `[[script]]` on [[os]] but `./[[script]]` says permission denied even though I own the file. Why?",
        "How do I run a shell script I just created on [[os]]? `./[[script]]` fails with `bash: ./[[script]]: "
        "Permission denied`.",
        "What does `chmod +x` do, and do I need it for `[[script]]` in `[[dir]]`?",
    ],
    intros=[
        "Add the execute bit with `chmod +x`.",
        "The file isn't marked executable yet; set the `x` permission.",
        "You need execute permission on `[[script]]`, not just read/write.",
    ],
    codes=[
        C("bash", "chmod +x [[script]]\n./[[script]]\nls -l [[script]]   # should show -rwxr-xr-x"),
        C("bash", "head -1 [[script]]     # should be a shebang, e.g. #!/usr/bin/env bash\nchmod u+x [[script]]\n"
                  "./[[script]]\n# or run it without the x bit:\nbash [[script]]",
          whys=("`u+x` adds execute permission for the owner only.",)),
    ],
    whys=[
        "The kernel only executes files with the execute bit set; new files are created without it.",
        "The script also needs a shebang line like `#!/usr/bin/env bash` so the right interpreter is used.",
        "If the file system is mounted `noexec`, run it with `bash [[script]]` instead.",
    ],
    wrong=[
        "run `sudo chmod -R 777 /` so you never see permission errors again.",
        "you need to reboot after creating a script before it can run.",
        "scripts can only be run by root, use sudo every time.",
    ],
    vague=[
        "Permissions on Linux are complicated, read a tutorial.",
        "Maybe your user account is broken.",
    ],
)

topic(
    name="js-async-await",
    title="JavaScript: promises and async/await",
    tool="Node", lang="JavaScript", thing="promises",
    questions=[
        "My function returns `Promise { <pending> }` instead of the [[cls]] data from `fetch('[[url]]')`. How do I "
        "get the actual value?",
        "How do I wait for `fetch('[[url]]')` to finish before using the [[cls]] list in JavaScript?",
        Q("I call an async function `load[[cls]]()` that fetches `[[url]]`, and `console.log` prints a pending "
          "promise. What am I doing wrong?", codes=[0],
          whys=("An async function always returns a promise, so the caller must await it too.",)),
        "What's the difference between `.then()` and `await` when loading [[cls]] records from `[[url]]` with fetch?",
    ],
    intros=[
        "`await` the promise inside an async function, or use `.then()`.",
        "You can't read the value synchronously; consume the promise with `await` or `.then`.",
    ],
    codes=[
        C("javascript", "async function load[[cls]]() {\n  const res = await fetch('[[url]]');\n"
                        "  if (!res.ok) throw new Error(`HTTP ${res.status}`);\n  return res.json();\n}\n\n"
                        "load[[cls]]().then(data => console.log(data));",
          whys=("fetch only rejects on network errors, so check `res.ok` for 404 or 500 responses.",)),
        C("javascript", "async function main() {\n  try {\n    const res = await fetch('[[url]]');\n"
                        "    const data = await res.json();\n    console.log(data);\n  } catch (err) {\n"
                        "    console.error('request failed', err);\n  }\n}\nmain();",
          whys=("`res.json()` also returns a promise, so it needs its own `await`.",)),
    ],
    whys=[
        "`fetch` is asynchronous; `await` pauses the async function until the promise settles.",
        "`.then` and `await` are equivalent; `await` just reads more like synchronous code.",
    ],
    wrong=[
        "wrap the call in `setTimeout(..., 1000)` and the value will be ready.",
        "`JSON.parse(promise)` extracts the value from a promise.",
        "add `sync: true` to the fetch options and it returns the data directly.",
    ],
    vague=[
        "Async code is hard, use callbacks instead.",
        "JavaScript is just weird like that.",
    ],
)

topic(
    name="js-reduce-sum",
    title="JavaScript: summing with reduce",
    tool="Node", lang="JavaScript", thing="array methods",
    questions=[
        "How do I sum the `[[numkey]]` field of every object in an array `[[var]]` in JavaScript?",
        Q("`[[var]].reduce((a, b) => a.[[numkey]] + b.[[numkey]])` returns NaN for three items. Why?",
          whys=("Without an initial value the first object becomes the accumulator; after one step it is a number, "
                "and `number.[[numkey]]` is undefined, which gives NaN.",)),
        "What's the idiomatic way to get the total `[[numkey]]` of a list of [[cls]] objects in JS?",
        Q("My `reduce` over `[[var]]` ([[cls]] objects) throws `Reduce of empty array with no initial value`. How "
          "do I fix it?",
          whys=("With an initial value, an empty array simply returns `0` instead of throwing.",)),
    ],
    intros=[
        "Use `reduce` with an initial value of `0`.",
        "Give `reduce` a starting value and add `item.[[numkey]]` to the accumulator.",
    ],
    codes=[
        C("javascript", "const total = [[var]].reduce((sum, item) => sum + item.[[numkey]], 0);"),
        C("javascript", "const total = [[var]]\n  .map(item => Number(item.[[numkey]]) || 0)\n"
                        "  .reduce((sum, n) => sum + n, 0);\nconsole.log(total.toFixed(2));",
          whys=("`Number(...) || 0` guards against missing fields and numeric strings.",)),
    ],
    whys=[
        "`reduce` walks the array once, passing the accumulator along; `0` is its start value.",
        "The accumulator should be a number, not an object, so start it at `0`.",
    ],
    wrong=[
        "`[[var]].sum('[[numkey]]')` is built into JavaScript arrays.",
        "`map` returns the sum when the callback returns a number.",
        "`reduce` only works on arrays of numbers, not objects.",
    ],
    vague=[
        "Use lodash, it has a function for everything.",
        "Loops are fine, functional style is overrated.",
    ],
)

topic(
    name="js-equality",
    title="JavaScript: == vs ===",
    tool="Node", lang="JavaScript", thing="comparisons in JavaScript",
    questions=[
        Q("Why does `[[num]] == '[[num]]'` return true in JavaScript but `[[num]] === '[[num]]'` returns false?",
          codes=[0]),
        "Should I use `==` or `===` when checking `[[key]]` values in JavaScript?",
        Q("My check `if ([[strvar]] == 0)` is true for an empty string. Why does JavaScript do that?", codes=[1]),
        "What exactly is the difference between `==` and `===` in JS?",
    ],
    intros=[
        "`==` converts types before comparing; `===` does not.",
        "`===` is strict equality: same type and same value. Use it unless you specifically want coercion.",
    ],
    codes=[
        C("javascript", "console.log([[num]] == '[[num]]');   // true  (string converted to number)\n"
                        "console.log([[num]] === '[[num]]');  // false (number vs string)\n"
                        "console.log(null == undefined);      // true"),
        C("javascript", "console.log('' == 0);    // true, '' becomes 0\nconsole.log('' === 0);   // false\n"
                        "if ([[strvar]] === '') {\n  // explicit check for the empty string\n}",
          whys=("An empty string converts to `0`, which is why `'' == 0` is true.",)),
    ],
    whys=[
        "`==` applies the abstract equality algorithm, converting strings to numbers before comparing.",
        "ESLint's `eqeqeq` rule enforces `===` for exactly these surprises.",
    ],
    wrong=[
        "`===` is just a faster version of `==`; they always return the same result.",
        "`==` compares object identity and `===` compares the contents.",
        "`===` only works for numbers.",
    ],
    vague=[
        "JavaScript has a lot of quirks, consider TypeScript.",
        "It depends on your coding style.",
    ],
)

topic(
    name="css-flexbox-center",
    title="CSS: centering with flexbox",
    tool="your browser", lang="CSS", thing="CSS layout",
    questions=[
        "How do I center a [[elem]] both horizontally and vertically inside its parent `.[[cssclass]]` with CSS?",
        "`margin: auto` centers my [[elem]] horizontally but not vertically in `.[[cssclass]]`. What's the modern "
        "way?",
        Q("I'm trying to vertically center a [[elem]] in `.[[cssclass]]` and `vertical-align: middle` does nothing. "
          "Why?", whys=("`vertical-align` only applies to inline and table-cell elements, which is why it did "
                        "nothing.",)),
        Q("What's the simplest flexbox setup to put a [[elem]] in the middle of the screen inside `.[[cssclass]]`?",
          codes=[0]),
    ],
    intros=["Center from the parent, not the child."],
    codes=[
        C("css", ".[[cssclass]] {\n  display: flex;\n  justify-content: center;  /* horizontal */\n"
                 "  align-items: center;      /* vertical */\n  min-height: 100vh;\n}",
          intros=("Make the parent a flex container and use `justify-content` and `align-items`.",
                  "Flexbox does this in three lines on the parent `.[[cssclass]]`."),
          whys=("In a row flex container `justify-content` aligns along the main axis and `align-items` along the "
                "cross axis.",)),
        C("css", ".[[cssclass]] {\n  display: grid;\n  place-items: center;\n  min-height: 400px;\n}",
          intros=("CSS grid can do it with a single `place-items` declaration on the parent.",),
          whys=("`place-items: center` is the grid shorthand for centering on both axes.",)),
    ],
    whys=[
        "The parent needs a height; otherwise it's only as tall as the child and there's nothing to center in.",
    ],
    wrong=[
        "`vertical-align: middle` on the [[elem]] centers it in any container.",
        "`text-align: center` also centers block elements vertically.",
        "vertical centering is impossible in CSS, use JavaScript to compute the offset.",
    ],
    vague=[
        "CSS is notoriously hard, maybe use a framework like Bootstrap.",
        "Try different values until it looks right.",
    ],
)

topic(
    name="css-position-absolute",
    title="CSS: absolute positioning inside a parent",
    tool="your browser", lang="CSS", thing="CSS positioning",
    questions=[
        "My `.[[absclass]]` with `position: absolute; top: 0; right: 0` sticks to the page corner, not its parent "
        "`.[[cssclass]]`. Why?",
        "How do I position a `.[[absclass]]` in the top-right corner of its parent `.[[cssclass]]`?",
        "Absolutely positioned `.[[absclass]]` ignores its container `.[[cssclass]]` and jumps to the top of the "
        "page. How do I fix it?",
        "What is the containing block of an element with `position: absolute`, like my `.[[absclass]]` inside "
        "`.[[cssclass]]`?",
    ],
    intros=[
        "Give the parent `position: relative`.",
        "The parent must be positioned for it to become the reference box.",
        "Set `position: relative` on `.[[cssclass]]`, then the offsets are relative to it.",
    ],
    codes=[
        C("css", ".[[cssclass]] {\n  position: relative;   /* creates the containing block */\n}\n"
                 ".[[cssclass]] .[[absclass]] {\n  position: absolute;\n  top: 0;\n  right: 0;\n}"),
        C("css", ".[[cssclass]] { position: relative; }\n.[[absclass]] {\n  position: absolute;\n  top: 8px;\n"
                 "  right: 8px;\n  z-index: 1;\n}",
          whys=("`z-index` only matters if the element is hidden behind other content; it doesn't change the "
                "reference box.",)),
    ],
    whys=[
        "An absolute element is placed relative to its nearest positioned ancestor; without one it uses the page.",
        "`position: relative` with no offsets doesn't move the parent, it just makes it the reference.",
    ],
    wrong=[
        "`absolute` always positions relative to the direct parent, so it's a browser bug.",
        "add `z-index: 9999` and it will move into the parent.",
        "use `position: fixed` instead, it's relative to the parent element.",
    ],
    vague=[
        "Positioning is a mess in CSS, use flexbox for everything.",
        "Clear your browser cache and look again.",
    ],
)

topic(
    name="docker-layer-cache",
    title="Docker: layer caching for dependencies",
    tool="Docker", lang="Docker", thing="Docker builds",
    questions=[
        "Every change to `[[pyfile]]` makes my Docker build (based on `[[pyimage]]`) reinstall all dependencies "
        "from `requirements.txt`. How do I make it use the cache?",
        "My Dockerfile based on `[[pyimage]]` takes minutes to build because `pip install [[pkg]]` runs every time. "
        "How do I speed it up?",
        "How should I order the instructions in a `[[pyimage]]` Dockerfile for a Python app (`[[pyfile]]`) so "
        "rebuilds are fast?",
        Q("Docker says 'Using cache' for the first steps of my `[[pyimage]]` build but always reruns "
          "`pip install [[pkg]]`. Why?",
          whys=("`COPY . .` before `pip install` changes with every edit, which invalidates every layer after it.",)),
    ],
    intros=[
        "Copy `requirements.txt` and install dependencies before copying the rest of the code.",
        "Order the Dockerfile so the dependency layer only depends on `requirements.txt`.",
    ],
    codes=[
        C("dockerfile", "FROM [[pyimage]]\nWORKDIR /app\nCOPY requirements.txt .\n"
                        "RUN pip install --no-cache-dir -r requirements.txt\n"
                        "COPY . .\nCMD [\"python\", \"[[pyfile]]\"]"),
        C("dockerfile", "FROM [[pyimage]]\nWORKDIR /app\nCOPY requirements.txt ./\n"
                        "RUN --mount=type=cache,target=/root/.cache/pip pip install -r requirements.txt\nCOPY . .\n"
                        "CMD [\"python\", \"[[pyfile]]\"]",
          whys=("The BuildKit cache mount keeps pip's download cache between builds even when the layer is "
                "rebuilt.",)),
    ],
    whys=[
        "Docker reuses a layer until its inputs change; copying only `requirements.txt` first means the install "
        "layer is rebuilt only when dependencies change.",
        "A `.dockerignore` for `.git`, `.venv` and `__pycache__` keeps the build context small and the cache stable.",
    ],
    wrong=[
        "Docker never caches `RUN` steps, so this is unavoidable.",
        "add `--no-cache` to `docker build`, which makes it reuse the cache.",
        "put `pip install` at the very end of the Dockerfile, the last layer is always cached.",
    ],
    vague=[
        "Docker builds are just slow, get a faster machine.",
        "Containers are overkill for Python, use a VM.",
    ],
)

topic(
    name="docker-port-publish",
    title="Docker: publishing ports",
    tool="Docker", lang="Docker", thing="Docker networking",
    questions=[
        "My Flask app `[[pyfile]]` runs in Docker on port [[port]] but `curl localhost:[[port]]` on the host says "
        "connection refused. What's wrong?",
        Q("I added `EXPOSE [[port]]` to my Dockerfile, but I still can't reach the app from my browser on [[os]]. "
          "Why?", codes=[0]),
        "How do I access a web server running inside a container on port [[port]] from the host machine on [[os]]?",
        Q("The logs of `[[pyfile]]` say the server is listening on `127.0.0.1:[[port]]` inside the container, yet "
          "nothing answers from outside. Why?", codes=[1]),
    ],
    intros=[
        "Publish the port with `-p` and make the app listen on `0.0.0.0`.",
        "Two things are needed: a published port and a server bound to all interfaces.",
    ],
    codes=[
        C("bash", "docker build -t myapp .\ndocker run --rm -p [[port]]:[[port]] myapp\ncurl http://localhost:[[port]]/",
          whys=("`docker ps` shows the published ports in the PORTS column, which is a quick way to check.",)),
        C("python", "# [[pyfile]]\nif __name__ == \"__main__\":\n    app.run(host=\"0.0.0.0\", port=[[port]])",
          whys=("Then start the container with `docker run -p [[port]]:[[port]] myapp`.",)),
    ],
    whys=[
        "Inside a container `127.0.0.1` is the container's own loopback, so the server must listen on `0.0.0.0`.",
        "`-p host:container` publishes the port; `EXPOSE` alone is only documentation and opens nothing.",
    ],
    wrong=[
        "`EXPOSE [[port]]` publishes the port to the host automatically.",
        "Docker containers can't run web servers, use a VM instead.",
        "you have to disable your host firewall completely for containers to work.",
    ],
    vague=[
        "Networking in Docker is complicated, read the whole manual.",
        "Try a different port, some are blocked.",
    ],
)

topic(
    name="pandas-groupby",
    title="pandas: groupby and aggregation",
    tool="pandas", lang="Python", thing="pandas",
    questions=[
        Q("I have a DataFrame with columns `[[gcol]]` and `[[ncol]]`. How do I get the mean and count of `[[ncol]]` "
          "per `[[gcol]]`?", codes=[0]),
        Q("How do I compute the total and average `[[ncol]]` for each `[[gcol]]` in pandas and get a normal "
          "DataFrame back?", codes=[1]),
        Q("`df.groupby('[[gcol]]')['[[ncol]]'].mean()` returns a weird object with `[[gcol]]` as the index. How do "
          "I turn it into columns?",
          whys=("By default the group keys become the index, which is what you are seeing.",)),
        "What's the pandas equivalent of `SELECT [[gcol]], AVG([[ncol]]) FROM df GROUP BY [[gcol]]`?",
    ],
    intros=[
        "Group by `[[gcol]]`, select `[[ncol]]` and aggregate with `agg`.",
        "`groupby` + `agg` gives you several statistics at once.",
    ],
    codes=[
        C("python", "summary = (\n    df.groupby(\"[[gcol]]\")[\"[[ncol]]\"]\n      .agg([\"mean\", \"count\"])\n"
                    "      .reset_index()\n)",
          whys=("`count` ignores NaN values; use `size` to count rows including missing values.",)),
        C("python", "summary = df.groupby(\"[[gcol]]\", as_index=False).agg(\n"
                    "    total_[[ncol]]=(\"[[ncol]]\", \"sum\"),\n    avg_[[ncol]]=(\"[[ncol]]\", \"mean\"),\n)",
          whys=("Named aggregation (`new_col=(column, func)`) gives the result columns readable names.",)),
    ],
    whys=[
        "`groupby` splits the frame by key, the column selection picks what to aggregate, and `agg` applies the "
        "functions.",
        "`reset_index()` (or `as_index=False`) turns the group keys back into a normal column.",
    ],
    wrong=[
        "`df.mean(\"[[gcol]]\")` groups by that column.",
        "`groupby` modifies `df` in place, so just print `df` afterwards.",
        "pandas can't aggregate, convert to a list of dicts and loop.",
    ],
    vague=[
        "pandas has a steep learning curve, watch some videos.",
        "Maybe export to Excel and use a pivot table.",
    ],
)

topic(
    name="pandas-boolean-filter",
    title="pandas: filtering rows on several conditions",
    tool="pandas", lang="Python", thing="pandas",
    questions=[
        "How do I select rows of my DataFrame where `[[ncol]]` is greater than [[num]] and `[[gcol]]` equals "
        "'[[val]]'?",
        Q("`df[df.[[ncol]] > [[num]] and df.[[gcol]] == '[[val]]']` raises 'The truth value of a Series is "
          "ambiguous'. Why?",
          whys=("Python's `and` needs a single True/False, but a Series holds many values, which is why pandas says "
                "it's ambiguous.",)),
        "What's the right syntax to combine two conditions when filtering a pandas DataFrame on `[[ncol]]` > [[num]] "
        "and `[[gcol]]` == '[[val]]'?",
        "How can I keep only the rows with `[[gcol]] == '[[val]]'` and `[[ncol]]` above [[num]] in pandas?",
    ],
    intros=[
        "Combine boolean masks with `&` (not `and`), with each condition in parentheses.",
        "Build one boolean mask from both conditions and select with it.",
    ],
    codes=[
        C("python", "mask = (df[\"[[ncol]]\"] > [[num]]) & (df[\"[[gcol]]\"] == \"[[val]]\")\nsubset = df.loc[mask]",
          whys=("`&` binds tighter than `>` and `==`, so the parentheses around each comparison are required.",
                "Selecting with `.loc[mask]` avoids chained indexing.")),
        C("python", "subset = df.query(\"[[ncol]] > [[num]] and [[gcol]] == '[[val]]'\").copy()\n"
                    "subset[\"flag\"] = True  # safe, it's a copy",
          whys=("`DataFrame.query` accepts `and` because it parses the expression itself.",
                "`.copy()` avoids the SettingWithCopyWarning when you modify the filtered frame later.")),
    ],
    whys=[
        "Element-wise logic on Series uses `&`, `|` and `~` instead of `and`, `or` and `not`.",
    ],
    wrong=[
        "Python's `and` works element-wise on Series, you just need to restart the kernel.",
        "pandas can't filter on two columns, loop with `iterrows` instead.",
        "use `df.filter([[num]])` to keep rows above a value.",
    ],
    vague=[
        "DataFrames can be filtered in many ways, check the pandas docs.",
        "Try SQL instead, it's clearer.",
    ],
)

topic(
    name="numpy-broadcasting",
    title="NumPy: broadcasting and axis",
    tool="NumPy", lang="Python", thing="NumPy arrays",
    questions=[
        "How do I normalize each column of a NumPy array of shape ([[nrows]], [[ncols]]) to zero mean and unit "
        "variance without a loop?",
        Q("What does `axis=0` mean in `X.mean(axis=0)` for an array with [[nrows]] rows and [[ncols]] columns?",
          whys=("`axis=1` would instead give one value per row, shape ([[nrows]],).",)),
        "I subtract the column means from my ([[nrows]], [[ncols]]) matrix with a Python loop and it's slow. "
        "Is there a vectorized way?",
        "Why can I subtract an array of shape ([[ncols]],) from one of shape ([[nrows]], [[ncols]]) in NumPy?",
    ],
    intros=[
        "Use broadcasting with the column statistics.",
        "Compute the statistics along `axis=0` and let broadcasting apply them to every row.",
        "No loop needed: NumPy broadcasts the per-column statistics over all [[nrows]] rows.",
    ],
    codes=[
        C("python", "import numpy as np\n\nX = np.random.rand([[nrows]], [[ncols]])\n"
                    "X_norm = (X - X.mean(axis=0)) / X.std(axis=0)\nprint(X_norm.mean(axis=0).round(6))",
          whys=("Add a small epsilon to the std if a column can be constant, to avoid dividing by zero.",)),
        C("python", "mu = X.mean(axis=0, keepdims=True)      # shape (1, [[ncols]])\n"
                    "sigma = X.std(axis=0, keepdims=True) + 1e-8\nX_norm = (X - mu) / sigma",
          whys=("`keepdims=True` keeps the reduced axis with length 1, which makes the broadcast explicit.",
                "The `1e-8` avoids division by zero for constant columns.")),
    ],
    whys=[
        "`axis=0` reduces over the rows, giving one value per column, shape ([[ncols]],).",
        "Broadcasting compares shapes from the right; ([[nrows]], [[ncols]]) and ([[ncols]],) match, so the "
        "statistics are stretched across all rows.",
        "The vectorized version runs in C and is typically orders of magnitude faster than a Python loop.",
    ],
    wrong=[
        "broadcasting only works when both arrays have exactly the same shape.",
        "`axis=0` means rows, so this normalizes each row.",
        "NumPy can't do this, use `for` loops, they are just as fast.",
    ],
    vague=[
        "Linear algebra is hard, maybe take a course first.",
        "Use a machine learning library, they do this for you.",
    ],
)

topic(
    name="c-pointer-swap",
    title="C: pass by value and pointers",
    tool="gcc", lang="C", thing="pointers in C",
    questions=[
        "My C function `void swap(int a, int b)` doesn't change `[[cvar]]` ([[num]]) and `[[cvar2]]` ([[num2]]) "
        "in main. Why?",
        "How do I write a function in C that swaps two integers of the caller, e.g. `[[cvar]] = [[num]]` and "
        "`[[cvar2]] = [[num2]]`?",
        "After calling `swap([[cvar]], [[cvar2]])` the variables still hold [[num]] and [[num2]]. Does C pass "
        "arguments by value?",
        Q("What's the point of passing `&[[cvar]]` to a swap function in C instead of `[[cvar]]`, which holds "
          "[[num]]?",
          whys=("`&[[cvar]]` is the address of the variable, so the function can write to the original.",)),
    ],
    intros=[
        "Pass pointers to the variables and swap through them.",
        "C passes arguments by value, so the function needs the addresses.",
        "Change the parameters to `int *` and call with `&[[cvar]]` and `&[[cvar2]]`.",
    ],
    codes=[
        C("c", "void swap(int *a, int *b) {\n    int tmp = *a;\n    *a = *b;\n    *b = tmp;\n}\n\n"
               "/* in main */\nswap(&[[cvar]], &[[cvar2]]);"),
        C("c", "#include <stdio.h>\n\nstatic void swap(int *p, int *q) { int t = *p; *p = *q; *q = t; }\n\n"
               "int main(void) {\n    int [[cvar]] = [[num]], [[cvar2]] = [[num2]];\n    swap(&[[cvar]], &[[cvar2]]);\n"
               "    printf(\"%d %d\\n\", [[cvar]], [[cvar2]]);   /* [[num2]] [[num]] */\n    return 0;\n}"),
    ],
    whys=[
        "C always passes arguments by value, so `swap` received copies; swapping copies doesn't affect the caller.",
        "Through a pointer parameter, `*p = ...` writes to the caller's variable, so the change is visible after "
        "the call.",
        "The same pattern is how functions like `scanf` return values through their arguments.",
    ],
    wrong=[
        "C passes all ints by reference, so the bug must be in your compiler.",
        "declare the variables `static` and the swap will work.",
        "return both values with `return [[cvar]], [[cvar2]];`.",
    ],
    vague=[
        "Pointers are the hardest part of C, keep practicing.",
        "Use a higher level language, C is outdated.",
    ],
)

topic(
    name="c-string-literal",
    title="C: modifying string literals",
    tool="gcc", lang="C", thing="strings in C",
    questions=[
        "Why does this segfault? `char *[[strvar]] = \"[[word]]\"; [[strvar]][0] = 'X';`",
        "Changing the first character of `[[strvar]]` crashes my C program with a segmentation fault. "
        "It's declared as `char *[[strvar]] = \"[[word]]\"`.",
        Q("What's the difference between `char [[strvar]][] = \"[[word]]\"` and `char *[[strvar]] = \"[[word]]\"` "
          "in C?", codes=[0]),
        "How do I get a modifiable copy of the string literal \"[[word]]\" in C?",
    ],
    intros=[
        "String literals are not modifiable; work on a copy instead.",
        "`char *` points at a read-only literal, so you need your own writable copy.",
    ],
    codes=[
        C("c", "char [[strvar]][] = \"[[word]]\";   /* array: writable copy */\n[[strvar]][0] = 'X';\n"
               "printf(\"%s\\n\", [[strvar]]);",
          intros=("Declare it as an array so you get a writable copy.",),
          whys=("`char s[] = \"...\"` creates an array initialised with a copy of the literal, which you may "
                "modify.",)),
        C("c", "#include <stdlib.h>\n#include <string.h>\n\nchar *[[strvar]] = strdup(\"[[word]]\");  /* heap copy */\n"
               "if ([[strvar]] != NULL) {\n    [[strvar]][0] = 'X';\n    free([[strvar]]);\n}",
          intros=("If you need a pointer, copy the literal to the heap with `strdup`.",),
          whys=("Memory from `strdup` comes from `malloc`, so it must be freed.",)),
    ],
    whys=[
        "A string literal usually lives in read-only memory; modifying it is undefined behaviour, here a segfault.",
        "Compile with `-Wall -Wwrite-strings` to get a warning when a literal is assigned to a non-const `char *`.",
    ],
    wrong=[
        "you need to call `free()` on the string before writing to it.",
        "strings in C are immutable in all cases, use C++ instead.",
        "the segfault happens because single quotes are not allowed in C.",
    ],
    vague=[
        "Segfaults can have many causes, run it in a debugger.",
        "C strings are dangerous, avoid them.",
    ],
)

topic(
    name="rust-borrow-checker",
    title="Rust: mutable and immutable borrows",
    tool="rustc", lang="Rust", thing="the borrow checker",
    questions=[
        "Rust complains `cannot borrow `[[var]]` as mutable because it is also borrowed as immutable` when I push "
        "[[num]] to a Vec while holding a reference to its first element. How do I fix it?",
        "Why does the borrow checker reject `let first = &[[var]][0]; [[var]].push([[num]]);` followed by a print of "
        "`first`?",
        "How can I read the first element of `[[var]]` and then push [[num]] in Rust without error E0502?",
        "What does error E0502 mean in Rust? I get it on `[[var]].push([[num]])` while holding `&[[var]][0]`.",
    ],
    intros=[
        "Copy or clone the value so the immutable borrow ends before `push`.",
        "Don't keep the reference alive across the `push`; take the value instead.",
        "The reference to `[[var]][0]` must end before you mutate the vector.",
    ],
    codes=[
        C("rust", "let mut [[var]] = vec![1, 2, 3];\nlet first = [[var]][0];      // i32 is Copy, no borrow kept\n"
                  "[[var]].push(first * 10);\nprintln!(\"{:?}\", [[var]]);"),
        C("rust", "let first = [[var]][0].clone();  // own the value\n[[var]].push(first.clone());\n"
                  "println!(\"{:?} {}\", first, [[var]].len());",
          whys=("`clone()` is needed for non-`Copy` types such as `String`.",)),
    ],
    whys=[
        "`&[[var]][0]` borrows the vector immutably and `push` needs `&mut`; since push may reallocate, the "
        "reference could dangle, so the borrow checker rejects it.",
        "Copying or cloning ends the immutable borrow before the mutable one starts.",
        "Thanks to non-lexical lifetimes, a reference that is last used before `push` is also fine.",
    ],
    wrong=[
        "wrap everything in `unsafe` and the borrow checker is turned off.",
        "Rust doesn't allow pushing to a Vec after creation; use an array.",
        "add `#[allow(borrow)]` above the function.",
    ],
    vague=[
        "Fighting the borrow checker is normal, it gets easier.",
        "Rust is too strict, maybe Go is a better fit.",
    ],
)

topic(
    name="rust-string-str",
    title="Rust: String vs &str parameters",
    tool="rustc", lang="Rust", thing="strings in Rust",
    questions=[
        Q("Function `fn greet(name: String)` forces me to write `greet(\"[[word]]\".to_string())`. Should I take "
          "`&str` instead?", codes=[0]),
        "What's the difference between `String` and `&str` in Rust, and which should `[[func]]` take for a value "
        "like \"[[word]]\"?",
        Q("Passing `&[[strvar]]` where `[[strvar]]: String` to `[[func]]`, which expects `&str`, compiles. Why does "
          "that work?", codes=[0],
          whys=("Deref coercion turns `&String` into `&str` automatically, which is why passing "
                "`&[[strvar]]` works.",)),
        Q("Rust says `expected String, found &str` when I call `[[func]]` with \"[[word]]\". What should I change?",
          codes=[0]),
    ],
    intros=[
        "Take `&str` unless the function needs to own the string.",
        "Use `&str` for read-only parameters; it accepts both literals and `&String`.",
    ],
    codes=[
        C("rust", "fn greet(name: &str) {\n    println!(\"Hello, {}!\", name);\n}\n\n"
                  "let owned = String::from(\"[[word]]\");\ngreet(\"[[word]]\");   // &'static str\n"
                  "greet(&owned);       // &String coerces to &str"),
        C("rust", "struct Person { name: String }\n\nimpl Person {\n"
                  "    fn new(name: impl Into<String>) -> Self { Person { name: name.into() } }\n}\n\n"
                  "let p = Person::new(\"[[word]]\");",
          whys=("`impl Into<String>` accepts both `&str` and `String` when the value has to be stored.",)),
    ],
    whys=[
        "`&str` is a borrowed view of UTF-8 text; `String` is an owned, growable buffer.",
        "`&String` converts to `&str` automatically through deref coercion.",
        "Take `String` only when the value is stored, like in a struct field.",
    ],
    wrong=[
        "`String` and `&str` are the same type; the compiler only warns.",
        "`&str` can only hold ASCII characters.",
        "always use `String` everywhere, `&str` is deprecated.",
    ],
    vague=[
        "Rust strings are famously confusing, read the book.",
        "Just add `.to_string()` everywhere until it compiles.",
    ],
)

topic(
    name="java-streams",
    title="Java: filtering and mapping with streams",
    tool="the JDK", lang="Java", thing="Java streams",
    questions=[
        "How do I use Java streams to get the names of all [[cls]] objects whose [[numkey]] is above [[num]], sorted "
        "alphabetically?",
        "I have a `List<[[cls]]> [[var]]`. What's the stream equivalent of a loop that collects the sorted names "
        "where `get[[NumKey]]() > [[num]]`?",
        Q("My stream `[[var]].stream().filter(x -> x.get[[NumKey]]() > [[num]]).map([[cls]]::getName)` doesn't do "
          "anything. Why is nothing executed?",
          whys=("Streams are lazy: intermediate operations like `filter` and `map` do nothing until a terminal "
                "operation is called.",)),
        "How do I turn a filtered `Stream<[[cls]]>` (`[[numkey]]` above [[num]]) back into a sorted `List<String>` "
        "of names in Java?",
    ],
    intros=[
        "Chain `filter`, `map`, `sorted` and finish with a terminal operation that collects the list.",
        "Filter on `get[[NumKey]]()`, map to the name, then collect into a list.",
    ],
    codes=[
        C("java", "List<String> names = [[var]].stream()\n    .filter(x -> x.get[[NumKey]]() > [[num]])\n"
                  "    .map([[cls]]::getName)\n    .sorted()\n    .collect(Collectors.toList());"),
        C("java", "List<String> names = [[var]].stream()\n    .filter(x -> x.get[[NumKey]]() > [[num]])\n"
                  "    .map([[cls]]::getName)\n    .sorted(Comparator.naturalOrder())\n    .toList();   // Java 16+",
          whys=("On Java 16+ `.toList()` replaces `collect(Collectors.toList())` and returns an unmodifiable list.",)),
    ],
    whys=[
        "`filter` keeps matching elements, `map` transforms them, and the terminal operation runs the pipeline.",
        "The original list is not modified; the stream produces a new one.",
    ],
    wrong=[
        "streams modify the original list in place, so just print `[[var]]` afterwards.",
        "`filter` must come after `collect`.",
        "streams only work on arrays, not on `List`.",
    ],
    vague=[
        "Streams are slower than loops, don't use them.",
        "Java is verbose, consider Kotlin.",
    ],
)

topic(
    name="java-string-equals",
    title="Java: comparing strings with equals",
    tool="the JDK", lang="Java", thing="string comparison in Java",
    questions=[
        Q("In Java, `if (input == \"[[word]]\")` is false even when I type [[word]]. Why?", codes=[0]),
        "How do I compare two strings in Java? `==` works sometimes but not for \"[[word]]\" read from `Scanner`.",
        "What's the difference between `==` and `.equals()` for Java strings like \"[[word]]\"?",
        Q("My loop should exit when the user enters \"[[word]]\", but `while (line != \"[[word]]\")` never stops. "
          "What's wrong?", codes=[1]),
    ],
    intros=[
        "Use `equals`, not `==`, to compare string contents.",
        "`==` compares references; `.equals()` compares characters.",
    ],
    codes=[
        C("java", "if (\"[[word]]\".equals(input)) {\n    System.out.println(\"match\");\n}",
          whys=("Putting the literal first avoids a NullPointerException if `input` is null.",)),
        C("java", "Scanner sc = new Scanner(System.in);\nString line = sc.nextLine();\n"
                  "while (!\"[[word]]\".equalsIgnoreCase(line.trim())) {\n    line = sc.nextLine();\n}",
          whys=("`equalsIgnoreCase` handles different capitalisation, and `trim()` removes stray whitespace.",)),
    ],
    whys=[
        "`==` compares object references, and a string read at runtime is a different object from the literal.",
        "It sometimes works with literals because identical literals are interned and share one object.",
    ],
    wrong=[
        "`==` compares contents for strings because `String` is a primitive type in Java.",
        "call `input.intern()` everywhere, that's the standard approach.",
        "use `input.compareTo(\"[[word]]\") == 1` to test equality.",
    ],
    vague=[
        "Java strings have always been weird.",
        "Try printing both values, maybe they differ.",
    ],
)

topic(
    name="go-waitgroup",
    title="Go: waiting for goroutines",
    tool="Go", lang="Go", thing="goroutines",
    questions=[
        Q("My Go program exits before the goroutines started in my loop (each calls `[[gofunc]]`) finish. How do I "
          "wait for all [[nworkers]] of them?", codes=[0]),
        "How do I run [[nworkers]] `[[gofunc]]` workers concurrently in Go and block until they are all done?",
        Q("I use `time.Sleep` at the end of main so my [[nworkers]] `[[gofunc]]` goroutines get a chance to run. "
          "Is there a proper way?",
          whys=("`time.Sleep` only hides the race; it breaks as soon as the work takes longer.",)),
        Q("Why does nothing get printed when I start [[nworkers]] goroutines running `[[gofunc]]` in a `for` loop "
          "in `main`?", codes=[0]),
    ],
    intros=[
        "Use a `sync.WaitGroup`.",
        "Track the goroutines with a `sync.WaitGroup` and `Wait` for it in main.",
        "`main` returning kills all goroutines; block on a WaitGroup instead.",
    ],
    codes=[
        C("go", "var wg sync.WaitGroup\nfor i := 0; i < [[nworkers]]; i++ {\n    wg.Add(1)\n    go func(id int) {\n"
                "        defer wg.Done()\n        [[gofunc]](id)\n    }(i)\n}\nwg.Wait()"),
        C("go", "errs := make(chan error, [[nworkers]])\nvar wg sync.WaitGroup\nfor i := 0; i < [[nworkers]]; i++ {\n"
                "    wg.Add(1)\n    go func(id int) { defer wg.Done(); errs <- [[gofunc]](id) }(i)\n}\nwg.Wait()\n"
                "close(errs)\nfor err := range errs {\n    if err != nil {\n        log.Println(err)\n    }\n}",
          whys=("The channel has room for all [[nworkers]] results, so no worker blocks, and closing it after `Wait` "
                "ends the range loop.",)),
    ],
    whys=[
        "When `main` returns, the program exits and running goroutines are killed.",
        "`Add` before starting each goroutine, `Done` when it finishes, and `Wait` blocks until the counter is zero.",
        "Passing `i` as an argument avoids all goroutines seeing the same loop variable before Go 1.22.",
    ],
    wrong=[
        "add `time.Sleep(time.Second)`, that is the proper synchronization.",
        "goroutines always finish before main exits, so the problem must be buffering in fmt.",
        "set `runtime.GOMAXPROCS(1)` and the goroutines will run synchronously.",
    ],
    vague=[
        "Concurrency is hard, avoid goroutines if you can.",
        "Go's scheduler is unpredictable.",
    ],
)

topic(
    name="http-cache-control",
    title="HTTP caching with Cache-Control",
    tool="your web server", lang="HTTP", thing="HTTP caching", site="webmasters.stackexchange.com",
    questions=[
        "How do I make browsers cache static files like `[[asset]]` (served by [[server]]) for a long time but "
        "still pick up new versions after a deploy?",
        "Users keep seeing an old `[[asset]]` after I deploy to [[server]]. What `Cache-Control` headers should I "
        "use?",
        Q("What's the difference between `no-cache` and `no-store` in Cache-Control, and which one for my HTML "
          "pages that load `[[asset]]` from [[server]]?",
          whys=("`no-cache` means 'store it but revalidate before use', while `no-store` forbids storing at all.",)),
        Q("What is a good caching strategy for `[[asset]]` served by nginx?", codes=[0]),
    ],
    intros=[
        "Use fingerprinted file names with a long `max-age`, and `no-cache` for the HTML.",
        "Cache the hashed assets forever and let the HTML be revalidated.",
    ],
    codes=[
        C("nginx", "location /static/ {\n    add_header Cache-Control \"public, max-age=31536000, immutable\";\n}\n"
                   "location / {\n    add_header Cache-Control \"no-cache\";\n}"),
        C("http", "# /static/[[asset]], renamed at build time to include a content hash\n"
                  "Cache-Control: public, max-age=31536000, immutable\n\n# index.html\nCache-Control: no-cache"),
    ],
    whys=[
        "With a content hash in the file name, the URL changes whenever the file changes, so a one-year `max-age` "
        "is safe.",
        "Because the HTML is revalidated, browsers see the new hashed URLs right after a deploy.",
        "Revalidation with `ETag` returns a cheap `304 Not Modified` when nothing changed.",
    ],
    wrong=[
        "browsers ignore `Cache-Control`; only a `<meta>` tag in the HTML body matters.",
        "set `max-age=0` to cache forever.",
        "`no-cache` means the browser never stores anything, it's the same as `no-store`.",
    ],
    vague=[
        "Caching is one of the two hard problems in computer science.",
        "Tell your users to press Ctrl+F5.",
    ],
)

topic(
    name="http-cors",
    title="HTTP: CORS errors",
    tool="your browser", lang="JavaScript", thing="CORS",
    questions=[
        "My frontend on `http://localhost:[[port]]` gets `No 'Access-Control-Allow-Origin' header` when calling my "
        "API at `[[url]]`. How do I fix it?",
        Q("Why does my fetch to `[[url]]` from `http://localhost:[[port]]` work in curl and Postman but fail in the "
          "browser with a CORS error?",
          whys=("CORS is enforced by the browser, which is why curl and Postman don't see the error.",)),
        Q("How do I enable CORS on my Express API (`[[url]]`) for a frontend served from port [[port]]?", codes=[0]),
        Q("The browser sends an OPTIONS request before my POST to `[[url]]` from `http://localhost:[[port]]` and it "
          "fails. What is that request?", codes=[1],
          whys=("For requests with a JSON body or custom headers, the browser first sends an OPTIONS preflight that "
                "must also get these headers.",)),
    ],
    intros=[
        "Configure the server to send `Access-Control-Allow-Origin` for your frontend's origin.",
        "CORS must be fixed on the API server, not in the frontend code.",
    ],
    codes=[
        C("javascript", "const cors = require('cors');\n\n"
                        "app.use(cors({ origin: 'http://localhost:[[port]]', credentials: true }));",
          whys=("The `cors` middleware also answers the OPTIONS preflight for you.",)),
        C("http", "HTTP/1.1 204 No Content\nAccess-Control-Allow-Origin: http://localhost:[[port]]\n"
                  "Access-Control-Allow-Methods: GET, POST, OPTIONS\nAccess-Control-Allow-Headers: Content-Type",
          whys=("The preflight response must list the method and headers the real request will use.",)),
    ],
    whys=[
        "The server must name the allowed origin in `Access-Control-Allow-Origin`.",
        "With cookies (`credentials`), the origin must be explicit; `*` is not allowed.",
    ],
    wrong=[
        "CORS errors are caused by your firewall, disable it.",
        "add `mode: 'no-cors'` to fetch and you'll be able to read the response.",
        "install a browser extension that disables CORS, that's how production sites do it.",
    ],
    vague=[
        "CORS is a nightmare, everybody struggles with it.",
        "Put everything on one server and you won't have the problem.",
    ],
)

topic(
    name="http-401-403",
    title="HTTP: 401 vs 403 status codes",
    tool="your framework", lang="HTTP", thing="HTTP status codes",
    questions=[
        Q("Should my API return 401 or 403 when a logged-in `[[role]]` user tries to access `[[url]]`, which they "
          "are not allowed to see?", codes=[0]),
        Q("What's the difference between HTTP 401 Unauthorized and 403 Forbidden for `[[url]]`, e.g. for a "
          "`[[role]]` account?", codes=[1]),
        Q("My endpoint `[[url]]` returns 401 when the token is valid but the role is `[[role]]` instead of admin. "
          "Is that correct?", codes=[0]),
        Q("Which status code should a REST API like `[[url]]` send for a missing token versus insufficient "
          "permissions?", codes=[1]),
    ],
    intros=[
        "Return 403 when the user is authenticated but not allowed, and 401 when they aren't authenticated.",
        "401 is about missing or invalid credentials; 403 is about permissions.",
    ],
    codes=[
        C("http", "HTTP/1.1 403 Forbidden\nContent-Type: application/json\n\n{\"error\": \"insufficient permissions\"}",
          whys=("Here the user is known but lacks the role, so 403 is the right code.",)),
        C("http", "HTTP/1.1 401 Unauthorized\nWWW-Authenticate: Bearer realm=\"api\"\n\n"
                  "HTTP/1.1 403 Forbidden\nContent-Type: application/json"),
    ],
    whys=[
        "401 means the request lacks valid authentication and should include a `WWW-Authenticate` header.",
        "403 means the server knows who you are but refuses; retrying with the same credentials won't help.",
        "Some APIs return 404 instead to avoid revealing that `[[url]]` exists.",
    ],
    wrong=[
        "401 and 403 are interchangeable, pick one at random.",
        "return 500 so the client retries with more permissions.",
        "403 is only used for blocked IP addresses.",
    ],
    vague=[
        "Status codes don't matter much as long as the body explains the error.",
        "Every API does it differently.",
    ],
)

# --------------------------------------------------------------------------------------------------------
# Answer keys and subtly broken variants, one entry per topic (checked: same names as TOPICS).
#   fix:    one list per code variant of the topic, in the order of its ``codes``: the terms the code of that
#           fix must contain (what makes it this fix). Slot-free: the question's names are checked apart.
#   broken: B(fence language, code, *markers): a variant of the fix that is wrong in substance (a classic
#           mistake, a wrong flag, an inverted test ...). The markers are the wrong part; they may use
#           ``[[slots]]`` and must never occur in a preferred answer of the topic (``check`` verifies it).
# Terms, markers and names are matched with ``contains``: case-sensitive, any run of whitespace equals one
# space, and a term that starts or ends with a letter or digit must not continue a longer word there.
# --------------------------------------------------------------------------------------------------------


def B(lang: str, code: str, *markers: str) -> dict:
    return {"lang": lang, "code": code, "markers": list(markers)}


KEYS: dict[str, dict] = {
    "python-list-dedup": dict(
        fix=[["dict.fromkeys("], ["seen = set()", "not in seen", "seen.add(", ".append("]],
        broken=[
            B("python", "[[var]] = list(set([[var]]))  # drops the duplicates", "= list(set("),
            B("python", "[[var]] = sorted(set([[var]]), key=str)", "sorted(set("),
            B("python", "seen = set()\nunique = []\nfor x in [[var]]:\n    if x in seen:\n        seen.add(x)\n"
                        "        unique.append(x)", "if x in seen:"),
        ]),
    "python-dict-sort": dict(
        fix=[["sorted(", ".items()", "kv[1]", "reverse=True"],
             ["sorted(", ".items()", "itemgetter(1)", "reverse=True"]],
        broken=[
            B("python", "ranking = sorted([[var]].items(), key=lambda kv: kv[0], reverse=True)\n"
                        "for key, value in ranking[:[[nsmall]]]:\n    print(key, value)", "kv[0]"),
            B("python", "from operator import itemgetter\n\n"
                        "by_value = dict(sorted([[var]].items(), key=itemgetter(0), reverse=True))", "itemgetter(0)"),
            B("python", "ranking = sorted([[var]].values(), reverse=True)\nfor value in ranking[:[[nsmall]]]:\n"
                        "    print(value)", ".values(), reverse=True)"),
        ]),
    "python-file-lines": dict(
        fix=[["with open(", "for line in f"], ["with open(", "enumerate(f"]],
        broken=[
            B("python", "with open(\"[[file]]\", encoding=\"utf-8\") as f:\n    for line in f.readlines():\n"
                        "        [[func]](line.rstrip(\"\\n\"))", "f.readlines()"),
            B("python", "with open(\"[[file]]\", encoding=\"utf-8\") as f:\n    for line in f.read():\n"
                        "        line = line.rstrip(\"\\n\")\n        [[func]](line)", "in f.read()"),
        ]),
    "python-exceptions": dict(
        fix=[["except (ValueError, KeyError)"], ["for item in", "except (ValueError, KeyError)"]],
        broken=[
            B("python", "try:\n    result = [[func]]([[var]])\nexcept ValueError or KeyError as exc:\n"
                        "    logger.warning(\"[[func]] failed: %s\", exc)\n    result = None",
              "except ValueError or KeyError"),
            B("python", "try:\n    result = [[func]]([[var]])\nexcept ValueError, KeyError:\n"
                        "    logger.warning(\"[[func]] failed\")\n    result = None", "except ValueError, KeyError"),
            B("python", "for item in [[var]]:\n    try:\n        [[func]](item)\n"
                        "    except ValueError and KeyError as exc:\n        print(f\"skipping {item!r}: {exc}\")\n"
                        "        continue", "except ValueError and KeyError"),
        ]),
    "python-venv": dict(
        fix=[["-m venv", "activate", "pip install"], ["-m venv", "activate", "pip install"]],
        broken=[
            B("bash", "cd [[dir]]\npython3 -m venv .venv\nsource .venv/bin/activate\nsudo pip install [[pkg]]\n"
                      "pip freeze > requirements.txt", "sudo pip install"),
            B("bash", "python3 -m venv .venv\npython -m pip install --upgrade pip\n"
                      "python -m pip install --user [[pkg]]", "install --user"),
        ]),
    "python-mutable-default": dict(
        fix=[["=None", "is None"], ["=None", "is None"]],
        broken=[
            B("python", "def add_item(item, [[var]]=[]):\n    if [[var]] is None:\n        [[var]] = []\n"
                        "    [[var]].append(item)\n    return [[var]]", "=[]):"),
            B("python", "def [[func]](value, [[var]]=list()):\n    [[var]].append(value)\n    return [[var]]",
              "=list()):"),
            B("python", "def [[func]](value, [[var]]=None):\n    [[var]] = [] if [[var]] is not None else [[var]]\n"
                        "    [[var]].append(value)\n    return [[var]]", "is not None else"),
        ]),
    "python-json": dict(
        fix=[["json.load(f)", "json.dump(", "indent=", "ensure_ascii=False"],
             ["json.loads(", "json.dumps(", "indent=", "ensure_ascii=False"]],
        broken=[
            B("python", "import json\n\nwith open(\"[[jsonfile]]\", encoding=\"utf-8\") as f:\n"
                        "    [[var]] = json.loads(f)\n\n[[var]][\"[[key]]\"] = \"updated\"\n\n"
                        "with open(\"[[jsonfile]]\", \"w\", encoding=\"utf-8\") as f:\n"
                        "    json.dump([[var]], f, indent=2, ensure_ascii=False)", "json.loads(f)"),
            B("python", "import json\n\nwith open(\"[[jsonfile]]\", encoding=\"utf-8\") as f:\n"
                        "    [[var]] = json.load(f)\n\n[[var]][\"[[key]]\"] = \"updated\"\n\n"
                        "with open(\"[[jsonfile]]\", \"a\", encoding=\"utf-8\") as f:\n"
                        "    json.dump([[var]], f, indent=2, ensure_ascii=False)", "\"a\", encoding"),
            B("python", "import json\nfrom pathlib import Path\n\npath = Path(\"[[jsonfile]]\")\n"
                        "data = json.load(path.read_text(encoding=\"utf-8\"))\ndata[\"[[key]]\"] = \"updated\"\n"
                        "path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding=\"utf-8\")",
              "json.load(path.read_text("),
        ]),
    "git-squash-rebase": dict(
        fix=[["rebase -i", "squash", "--force-with-lease"], ["reset --soft", "git commit", "--force-with-lease"]],
        broken=[
            B("bash", "git checkout [[branch]]\ngit reset --hard HEAD~[[nsmall]]\n"
                      "git commit -m \"Add [[branch]] feature\"\ngit push --force-with-lease", "reset --hard"),
            B("bash", "git checkout [[branch]]\ngit rebase -i HEAD~[[nsmall]]\n"
                      "# in the editor change \"pick\" to \"drop\" for every commit except the first\n"
                      "git push --force-with-lease origin [[branch]]", "to \"drop\""),
            B("bash", "git checkout [[branch]]\ngit merge --squash [[branch]]\n"
                      "git commit -m \"Add [[branch]] feature\"\ngit push origin [[branch]]", "merge --squash"),
        ]),
    "git-undo-commit": dict(
        fix=[["reset --soft HEAD~1"], ["git reset HEAD~1"]],
        broken=[
            B("bash", "git reset --hard HEAD~1\ngit status   # [[file]] is still there", "reset --hard HEAD~1"),
            B("bash", "git checkout HEAD~1\ngit status   # [[file]] is back to the old version", "checkout HEAD~1"),
            B("bash", "git reset --soft HEAD~2\ngit status   # [[file]] is still staged", "HEAD~2"),
        ]),
    "git-merge-conflict": dict(
        fix=[["<<<<<<<", ">>>>>>>", "git add", "git commit"], ["--theirs", "git add", "git commit"]],
        broken=[
            B("bash", "git status                 # lists conflicted files\n"
                      "# edit [[file]]: delete everything between <<<<<<< and >>>>>>>, markers included\n"
                      "git add [[file]]\ngit commit                 # concludes the merge",
              "delete everything between"),
            B("bash", "git status                 # lists conflicted files\ngit reset --hard origin/[[branch]]\n"
                      "git add [[file]]\ngit commit                 # concludes the merge", "reset --hard"),
            B("bash", "git status\ngit add [[file]]   # the <<<<<<< markers can stay in the file\ngit commit\n"
                      "git push --force", "markers can stay", "push --force"),
        ]),
    "sql-left-join": dict(
        fix=[["LEFT JOIN", "ON"], ["LEFT JOIN", "COUNT(o.id)", "GROUP BY"]],
        broken=[
            B("sql", "SELECT t.id, t.[[col]], o.id AS match_id\nFROM [[table]] AS t\nINNER JOIN [[table2]] AS o\n"
                     "  ON o.[[fk]] = t.id;", "INNER JOIN [[table2]]"),
            B("sql", "SELECT t.id, t.[[col]], o.id AS match_id\nFROM [[table]] AS t\nLEFT JOIN [[table2]] AS o\n"
                     "  ON o.[[fk]] = t.id\nWHERE o.id IS NOT NULL;", "WHERE o.id IS NOT NULL"),
            B("sql", "SELECT t.id, COUNT(*) AS n_[[table2]]\nFROM [[table]] t\n"
                     "LEFT JOIN [[table2]] o ON o.[[fk]] = t.id\nGROUP BY t.id;", "COUNT(*)"),
            B("sql", "SELECT t.id, t.[[col]], o.id AS match_id\nFROM [[table]] AS t\nRIGHT JOIN [[table2]] AS o\n"
                     "  ON o.[[fk]] = t.id;", "RIGHT JOIN [[table2]]"),
        ]),
    "sql-group-having": dict(
        fix=[["GROUP BY", "HAVING COUNT(*) >"], ["GROUP BY", "HAVING COUNT(*) >"]],
        broken=[
            B("sql", "SELECT [[fk]], COUNT(*) AS n\nFROM [[table2]]\nWHERE COUNT(*) > [[nsmall]]\nGROUP BY [[fk]];",
              "WHERE COUNT(*)"),
            B("sql", "SELECT [[fk]], COUNT(*) AS n\nFROM [[table2]]\nGROUP BY [[fk]]\nHAVING COUNT(*) >= [[nsmall]];",
              "COUNT(*) >="),
            B("sql", "SELECT [[fk]], COUNT(*) AS n\nFROM [[table2]]\nWHERE [[col]] IS NOT NULL\nGROUP BY [[fk]]\n"
                     "HAVING COUNT(*) < [[nsmall]]\nORDER BY n DESC;", "COUNT(*) <"),
        ]),
    "sql-parameterized": dict(
        fix=[["= ?", "(value,"], ["= ?", "(value,"]],
        broken=[
            B("python", "cur.execute(\n    f\"SELECT * FROM [[table]] WHERE [[col]] = '{value}'\"\n)\n"
                        "rows = cur.fetchall()", "'{value}'"),
            B("python", "cur.execute(\n    \"SELECT * FROM [[table]] WHERE [[col]] = '%s'\" % value\n)\n"
                        "rows = cur.fetchall()", "'%s'\" % value"),
            B("python", "import sqlite3\n\nconn = sqlite3.connect(\"app.db\")\nrows = conn.execute(\n"
                        "    \"SELECT id, [[col]] FROM [[table]] WHERE [[col]] = '?' LIMIT ?\",\n"
                        "    (value, [[num]]),\n).fetchall()", "= '?'"),
            B("python", "cur.execute(\n    \"SELECT * FROM [[table]] WHERE [[col]] = '\" + value + \"'\"\n)\n"
                        "rows = cur.fetchall()", "+ value +"),
        ]),
    "regex-findall-numbers": dict(
        fix=[["re.findall(", "\\d+"], ["re.compile(", ".findall(", "\\d+"]],
        broken=[
            B("python", "import re\n\ntext = \"[[word]] [[num]] at line [[num2]]\"\n"
                        "numbers = [int(n) for n in re.findall(r\"\\d\", text)]\nprint(numbers)", "r\"\\d\""),
            B("python", "import re\n\ntext = \"[[word]] [[num]] at line [[num2]]\"\n"
                        "numbers = [int(n) for n in re.match(r\"\\d+\", text)]\nprint(numbers)", "re.match(r\""),
            B("python", "import re\n\nNUM = re.compile(r\"-?d+\")\nwith open(\"[[file]]\") as f:\n"
                        "    for line in f:\n        print([int(n) for n in NUM.findall(line)])", "r\"-?d+\""),
        ]),
    "regex-greedy-lazy": dict(
        fix=[["re.findall(", "<.*?>"], ["re.findall(", "[^\\]]"], ["re.findall(", "(.*?)"]],
        broken=[
            B("python", "import re\n\nre.findall(r\"<.*>\", \"<[[tag]]>[[word]]</[[tag]]>\")\n"
                        "# ['<[[tag]]>', '</[[tag]]>']", "r\"<.*>\""),
            B("python", "import re\n\ntext = '[[[word]]] and [[[key]]]'\nprint(re.findall(r\"\\[(.*)\\]\", text))\n"
                        "# ['[[word]]', '[[key]]']", "\\[(.*)\\]"),
            B("python", "import re\n\nline = 'key=\"[[word]]\" other=\"[[key]]\"'\n"
                        "print(re.findall(r'\"(.*)\"', line))\n# ['[[word]]', '[[key]]']", "'\"(.*)\"'"),
        ]),
    "bash-loop-files": dict(
        fix=[["for f in", "\"$f\""], ["for f in", "\"$f\""]],
        broken=[
            B("bash", "for f in $(ls [[dir]]/*.[[ext]]); do\n    [ -e \"$f\" ] || continue\n"
                      "    echo \"processing $f\"\n    wc -l \"$f\"\ndone", "$(ls [[dir]]"),
            B("bash", "for f in [[dir]]/*.[[ext]]; do\n    [ -e $f ] || continue\n    echo \"processing $f\"\n"
                      "    wc -l $f\ndone", "wc -l $f"),
            B("bash", "shopt -s nullglob\nfor f in \"[[dir]]/*.[[ext]]\"; do\n    cp -- \"$f\" \"$f.bak\"\ndone",
              "in \"[[dir]]/*"),
        ]),
    "bash-quoting-test": dict(
        fix=[["[ \"$"], ["[ -z \"$", "[ \"$"]],
        broken=[
            B("bash", "if [ $[[strvar]] = \"[[word]]\" ]; then\n    echo \"match\"\nfi", "[ $[[strvar]] ="),
            B("bash", "if [ \"$[[strvar]]\" -eq \"[[word]]\" ]; then\n    echo \"match\"\nfi", "\" -eq \""),
            B("bash", "if [ -z $[[strvar]] ]; then\n    echo \"empty\"\nelif [ \"$[[strvar]]\"=\"[[word]]\" ]; then\n"
                      "    echo \"match\"\nfi", "[ -z $[[strvar]]", "\"=\""),
        ]),
    "grep-recursive": dict(
        fix=[["grep -rl"], ["grep -rli"]],
        broken=[
            B("bash", "grep -l \"[[word]]\" [[dir]]/\n# only .[[ext]] files:\n"
                      "grep -l --include=\"*.[[ext]]\" \"[[word]]\" [[dir]]/", "grep -l \""),
            B("bash", "grep -rL \"[[word]]\" [[dir]]/\n# only .[[ext]] files:\n"
                      "grep -rL --include=\"*.[[ext]]\" \"[[word]]\" [[dir]]/", "grep -rL"),
            B("bash", "grep -rvl \"[[word]]\" [[dir]]/\n# with find, if you need more filters:\n"
                      "find [[dir]] -name \"[[word]]\" -exec grep -l \"[[word]]\" {} +",
              "grep -rvl", "-name \"[[word]]\""),
        ]),
    "linux-chmod": dict(
        fix=[["chmod +x"], ["chmod u+x"]],
        broken=[
            B("bash", "chmod -x [[script]]\n./[[script]]\nls -l [[script]]   # should show -rwxr-xr-x", "chmod -x"),
            B("bash", "chmod 644 [[script]]\n./[[script]]\nls -l [[script]]   # should show -rw-r--r--", "chmod 644"),
            B("bash", "head -1 [[script]]     # should be a shebang, e.g. #!/usr/bin/env bash\nchmod u+r [[script]]\n"
                      "./[[script]]", "chmod u+r"),
        ]),
    "js-async-await": dict(
        fix=[["async function", "await fetch("], ["async function", "await fetch(", "await res.json()"]],
        broken=[
            B("javascript", "function load[[cls]]() {\n  const res = fetch('[[url]]');\n"
                            "  if (!res.ok) throw new Error(`HTTP ${res.status}`);\n  return res.json();\n}\n\n"
                            "console.log(load[[cls]]());", "const res = fetch("),
            B("javascript", "async function main() {\n  try {\n    const res = await fetch('[[url]]');\n"
                            "    const data = res.json();\n    console.log(data);\n  } catch (err) {\n"
                            "    console.error('request failed', err);\n  }\n}\nmain();", "const data = res.json()"),
            B("javascript", "async function load[[cls]]() {\n  const res = await fetch('[[url]]');\n"
                            "  return res.json();\n}\n\nconst data = load[[cls]]();\nconsole.log(data.length);",
              "const data = load"),
        ]),
    "js-reduce-sum": dict(
        fix=[[".reduce(", ", 0)"], [".map(", ".reduce(", ", 0)"]],
        broken=[
            B("javascript", "const total = [[var]].reduce((a, b) => a.[[numkey]] + b.[[numkey]]);",
              "a.[[numkey]] + b.[[numkey]]"),
            B("javascript", "const total = [[var]].reduce((sum, item) => sum + item.[[numkey]]);",
              "sum + item.[[numkey]])"),
            B("javascript", "const total = [[var]]\n  .map(item => Number(item.[[numkey]]) || 0)\n"
                            "  .reduce((sum, n) => sum + n, '');\nconsole.log(total);", ", '')"),
        ]),
    "js-equality": dict(
        fix=[["==="], ["=== ''"]],
        broken=[
            B("javascript", "console.log([[num]] == '[[num]]');   // false (number vs string)\n"
                            "console.log([[num]] === '[[num]]');  // true  (same value)\n"
                            "console.log(null == undefined);      // false", " == '[[num]]'); // false"),
            B("javascript", "console.log('' == 0);    // false, '' is not a number\nconsole.log('' === 0);   // true\n"
                            "if ([[strvar]] == '') {\n  // explicit check for the empty string\n}", "[[strvar]] == ''"),
        ]),
    "css-flexbox-center": dict(
        fix=[["display: flex", "justify-content: center", "align-items: center"],
             ["display: grid", "place-items: center"]],
        broken=[
            B("css", ".[[cssclass]] {\n  display: flex;\n  justify-content: center;  /* horizontal */\n"
                     "  vertical-align: middle;   /* vertical */\n  min-height: 100vh;\n}", "vertical-align: middle"),
            B("css", ".[[cssclass]] {\n  display: block;\n  justify-content: center;  /* horizontal */\n"
                     "  align-items: center;      /* vertical */\n  min-height: 100vh;\n}", "display: block"),
            B("css", ".[[cssclass]] {\n  display: grid;\n  place-items: start;\n  min-height: 400px;\n}",
              "place-items: start"),
        ]),
    "css-position-absolute": dict(
        fix=[["position: relative", "position: absolute"], ["position: relative", "position: absolute"]],
        broken=[
            B("css", ".[[cssclass]] {\n  position: static;     /* creates the containing block */\n}\n"
                     ".[[cssclass]] .[[absclass]] {\n  position: absolute;\n  top: 0;\n  right: 0;\n}",
              "position: static"),
            B("css", ".[[cssclass]] { position: absolute; }\n.[[absclass]] {\n  position: relative;\n  top: 8px;\n"
                     "  right: 8px;\n  z-index: 1;\n}", ".[[absclass]] { position: relative"),
            B("css", ".[[cssclass]] { position: relative; }\n.[[absclass]] {\n  position: fixed;\n  top: 8px;\n"
                     "  right: 8px;\n  z-index: 1;\n}", "position: fixed"),
        ]),
    "docker-layer-cache": dict(
        fix=[["COPY requirements.txt", "-r requirements.txt", "COPY . ."],
             ["COPY requirements.txt", "-r requirements.txt", "COPY . ."]],
        broken=[
            B("dockerfile", "FROM [[pyimage]]\nWORKDIR /app\nCOPY . .\n"
                            "RUN pip install --no-cache-dir -r requirements.txt\nCMD [\"python\", \"[[pyfile]]\"]",
              "COPY . . RUN pip install"),
            B("dockerfile", "FROM [[pyimage]]\nWORKDIR /app\nRUN pip install --no-cache-dir -r requirements.txt\n"
                            "COPY requirements.txt .\nCOPY . .\nCMD [\"python\", \"[[pyfile]]\"]",
              "WORKDIR /app RUN pip install"),
            B("dockerfile", "FROM [[pyimage]]\nWORKDIR /app\nCOPY . ./\n"
                            "RUN --mount=type=cache,target=/root/.cache/pip pip install -r requirements.txt\n"
                            "CMD [\"python\", \"[[pyfile]]\"]", "COPY . ./ RUN"),
        ]),
    "docker-port-publish": dict(
        fix=[["docker run", "-p"], ["host=\"0.0.0.0\""]],
        broken=[
            B("bash", "docker build -t myapp .\ndocker run --rm --expose [[port]] myapp\ncurl http://localhost:[[port]]/",
              "--expose"),
            B("bash", "docker build -t myapp .\ndocker run --rm -p [[port]] myapp\ncurl http://localhost:[[port]]/",
              "-p [[port]] myapp"),
            B("python", "# [[pyfile]]\nif __name__ == \"__main__\":\n    app.run(host=\"127.0.0.1\", port=[[port]])",
              "host=\"127.0.0.1\""),
        ]),
    "pandas-groupby": dict(
        fix=[["groupby(", ".agg(", "reset_index()"], ["groupby(", "as_index=False", ".agg("]],
        broken=[
            B("python", "summary = (\n    df.groupby(\"[[ncol]]\")[\"[[gcol]]\"]\n      .agg([\"mean\", \"count\"])\n"
                        "      .reset_index()\n)", "groupby(\"[[ncol]]\")"),
            B("python", "summary = (\n    df.sort_values(\"[[gcol]]\")[\"[[ncol]]\"]\n"
                        "      .agg([\"mean\", \"count\"])\n      .reset_index()\n)", "sort_values("),
            B("python", "summary = df.groupby(\"[[gcol]]\", as_index=False).agg(\n"
                        "    total_[[ncol]]=(\"[[ncol]]\", \"count\"),\n    avg_[[ncol]]=(\"[[ncol]]\", \"max\"),\n)",
              "(\"[[ncol]]\", \"max\")"),
        ]),
    "pandas-boolean-filter": dict(
        fix=[[") & (", ".loc["], ["df.query("]],
        broken=[
            B("python", "subset = df[(df[\"[[ncol]]\"] > [[num]]) and (df[\"[[gcol]]\"] == \"[[val]]\")]",
              ") and (df["),
            B("python", "mask = df[\"[[ncol]]\"] > [[num]] & df[\"[[gcol]]\"] == \"[[val]]\"\nsubset = df.loc[mask]",
              "> [[num]] & df["),
            B("python", "mask = (df[\"[[ncol]]\"] > [[num]]) | (df[\"[[gcol]]\"] == \"[[val]]\")\n"
                        "subset = df.loc[mask]", ") | (df["),
        ]),
    "numpy-broadcasting": dict(
        fix=[["mean(axis=0", "std(axis=0"], ["mean(axis=0", "std(axis=0"]],
        broken=[
            B("python", "import numpy as np\n\nX = np.random.rand([[nrows]], [[ncols]])\n"
                        "X_norm = (X - X.mean(axis=1)) / X.std(axis=1)\nprint(X_norm.mean(axis=1).round(6))",
              "mean(axis=1"),
            B("python", "import numpy as np\n\nX = np.random.rand([[nrows]], [[ncols]])\n"
                        "X_norm = (X - X.mean()) / X.std()\nprint(X_norm.mean().round(6))", "X.mean())"),
            B("python", "mu = X.mean(axis=1, keepdims=True)      # shape ([[nrows]], 1)\n"
                        "sigma = X.std(axis=1, keepdims=True) + 1e-8\nX_norm = (X - mu) / sigma", "mean(axis=1"),
        ]),
    "c-pointer-swap": dict(
        fix=[["int *", "swap(&"], ["int *", "swap(&"]],
        broken=[
            B("c", "void swap(int *a, int *b) {\n    int *tmp = a;\n    a = b;\n    b = tmp;\n}\n\n"
                   "/* in main */\nswap(&[[cvar]], &[[cvar2]]);", "int *tmp = a;"),
            B("c", "void swap(int *a, int *b) {\n    int tmp = *a;\n    *a = *b;\n    *b = tmp;\n}\n\n"
                   "/* in main */\nswap([[cvar]], [[cvar2]]);", "swap([[cvar]], [[cvar2]])"),
            B("c", "#include <stdio.h>\n\nstatic void swap(int p, int q) { int t = p; p = q; q = t; }\n\n"
                   "int main(void) {\n    int [[cvar]] = [[num]], [[cvar2]] = [[num2]];\n"
                   "    swap([[cvar]], [[cvar2]]);\n"
                   "    printf(\"%d %d\\n\", [[cvar]], [[cvar2]]);   /* [[num2]] [[num]] */\n    return 0;\n}",
              "swap(int p, int q)"),
        ]),
    "c-string-literal": dict(
        fix=[["[] = \""], ["strdup(", "free("]],
        broken=[
            B("c", "char *[[strvar]] = \"[[word]]\";   /* pointer to the literal */\n[[strvar]][0] = 'X';\n"
                   "printf(\"%s\\n\", [[strvar]]);", "char *[[strvar]] = \""),
            B("c", "#include <stdlib.h>\n#include <string.h>\n\nchar *[[strvar]] = malloc(strlen(\"[[word]]\"));\n"
                   "strcpy([[strvar]], \"[[word]]\");\n[[strvar]][0] = 'X';\nfree([[strvar]]);",
              "malloc(strlen(\"[[word]]\"))"),
            B("c", "const char *[[strvar]] = \"[[word]]\";   /* const pointer: writable */\n[[strvar]][0] = 'X';\n"
                   "printf(\"%s\\n\", [[strvar]]);", "const char *"),
        ]),
    "rust-borrow-checker": dict(
        fix=[["let first =", "[0];", ".push("], [".clone()", ".push("]],
        broken=[
            B("rust", "let mut [[var]] = vec![1, 2, 3];\nlet first = &[[var]][0];     // keep a reference\n"
                      "[[var]].push(*first * 10);\nprintln!(\"{:?} {}\", [[var]], first);", "let first = &"),
            B("rust", "let first = &mut [[var]][0];  // borrow it mutably instead\n[[var]].push(first.clone());\n"
                      "println!(\"{:?} {}\", first, [[var]].len());", "&mut [[var]][0]"),
            B("rust", "let first = &[[var]][0];\nunsafe {\n    [[var]].push(first.clone());\n}\n"
                      "println!(\"{:?} {}\", first, [[var]].len());", "unsafe {"),
        ]),
    "rust-string-str": dict(
        fix=[["name: &str"], ["impl Into<String>"]],
        broken=[
            B("rust", "fn greet(name: String) {\n    println!(\"Hello, {}!\", name);\n}\n\n"
                      "let owned = String::from(\"[[word]]\");\ngreet(\"[[word]]\");   // &'static str\n"
                      "greet(&owned);       // &String coerces to String", "name: String)"),
            B("rust", "fn greet(name: &String) {\n    println!(\"Hello, {}!\", name);\n}\n\n"
                      "let owned = String::from(\"[[word]]\");\ngreet(\"[[word]]\");   // &'static str\n"
                      "greet(&owned);", "name: &String"),
            B("rust", "struct Person { name: &str }\n\nimpl Person {\n"
                      "    fn new(name: &str) -> Self { Person { name } }\n}\n\n"
                      "let p = Person::new(\"[[word]]\");", "{ name: &str }"),
        ]),
    "java-streams": dict(
        fix=[[".stream()", ".filter(", ".map(", ".sorted(", ".collect("],
             [".stream()", ".filter(", ".map(", ".sorted(", ".toList()"]],
        broken=[
            B("java", "Stream<String> names = [[var]].stream()\n    .filter(x -> x.get[[NumKey]]() > [[num]])\n"
                      "    .map([[cls]]::getName)\n    .sorted();", "Stream<String> names"),
            B("java", "List<String> names = [[var]].stream()\n    .filter(x -> x.get[[NumKey]]() < [[num]])\n"
                      "    .map([[cls]]::getName)\n    .sorted()\n    .collect(Collectors.toList());", "() < [[num]]"),
            B("java", "List<String> names = [[var]].stream()\n    .map([[cls]]::getName)\n"
                      "    .filter(x -> x.get[[NumKey]]() > [[num]])\n    .sorted(Comparator.naturalOrder())\n"
                      "    .toList();   // Java 16+", "::getName) .filter("),
        ]),
    "java-string-equals": dict(
        fix=[[".equals("], [".equalsIgnoreCase("]],
        broken=[
            B("java", "if (input == \"[[word]]\") {\n    System.out.println(\"match\");\n}", "input == \""),
            B("java", "Scanner sc = new Scanner(System.in);\nString line = sc.nextLine();\n"
                      "while (\"[[word]]\".equalsIgnoreCase(line.trim())) {\n    line = sc.nextLine();\n}",
              "while (\"[[word]]\".equalsIgnoreCase"),
            B("java", "if (input.compareTo(\"[[word]]\") == 1) {\n    System.out.println(\"match\");\n}",
              ".compareTo("),
        ]),
    "go-waitgroup": dict(
        fix=[["sync.WaitGroup", "wg.Add(", "wg.Done()", "wg.Wait()"],
             ["sync.WaitGroup", "wg.Add(", "wg.Done()", "wg.Wait()"]],
        broken=[
            B("go", "var wg sync.WaitGroup\nfor i := 0; i < [[nworkers]]; i++ {\n    go func(id int) {\n"
                    "        wg.Add(1)\n        defer wg.Done()\n        [[gofunc]](id)\n    }(i)\n}\nwg.Wait()",
              "int) { wg.Add(1)"),
            B("go", "var wg sync.WaitGroup\nfor i := 0; i < [[nworkers]]; i++ {\n    wg.Add(1)\n    go func(id int) {\n"
                    "        defer wg.Done()\n        [[gofunc]](id)\n    }(i)\n}\ntime.Sleep(time.Second)",
              "time.Sleep("),
            B("go", "var wg sync.WaitGroup\nfor i := 0; i < [[nworkers]]; i++ {\n    wg.Add(1)\n    go func(id int) {\n"
                    "        defer wg.Wait()\n        [[gofunc]](id)\n    }(i)\n}\nwg.Done()", "defer wg.Wait()"),
        ]),
    "http-cache-control": dict(
        fix=[["max-age=31536000", "no-cache"], ["max-age=31536000", "no-cache"]],
        broken=[
            B("nginx", "location /static/ {\n    add_header Cache-Control \"no-store\";\n}\n"
                       "location / {\n    add_header Cache-Control \"public, max-age=31536000, immutable\";\n}",
              "Cache-Control \"no-store\""),
            B("http", "# /static/[[asset]], renamed at build time to include a content hash\n"
                      "Cache-Control: public, max-age=0, immutable\n\n# index.html\nCache-Control: no-cache",
              "max-age=0"),
            B("http", "# /static/[[asset]], same name after every deploy\n"
                      "Cache-Control: public, max-age=31536000, immutable\n\n# index.html\n"
                      "Cache-Control: public, max-age=31536000", "# index.html Cache-Control: public"),
        ]),
    "http-cors": dict(
        fix=[["cors(", "origin:"], ["Access-Control-Allow-Origin:"]],
        broken=[
            B("javascript", "fetch('[[url]]', { mode: 'no-cors', credentials: 'include' })\n"
                            "  .then(res => res.json());", "no-cors"),
            B("javascript", "const cors = require('cors');\n\napp.use(cors({ origin: '*', credentials: true }));",
              "origin: '*'"),
            B("javascript", "fetch('[[url]]', {\n"
                            "  headers: { 'Access-Control-Allow-Origin': 'http://localhost:[[port]]' },\n});",
              "headers: { 'Access-Control"),
        ]),
    "http-401-403": dict(
        fix=[["403 Forbidden"], ["401 Unauthorized", "403 Forbidden"]],
        broken=[
            B("http", "HTTP/1.1 401 Unauthorized\nContent-Type: application/json\n\n"
                      "{\"error\": \"insufficient permissions\"}", "401 Unauthorized Content-Type"),
            B("http", "HTTP/1.1 403 Forbidden\nWWW-Authenticate: Bearer realm=\"api\"\n\n"
                      "HTTP/1.1 401 Unauthorized\nContent-Type: application/json", "403 Forbidden WWW-Authenticate"),
            B("http", "HTTP/1.1 500 Internal Server Error\nContent-Type: application/json\n\n"
                      "{\"error\": \"insufficient permissions\"}", "500 Internal"),
        ]),
}


for _t in TOPICS:  # every topic has an answer key with one fix per code variant, and broken variants
    if _t["name"] not in KEYS or len(KEYS[_t["name"]]["fix"]) != len(_t["codes"]) or not KEYS[_t["name"]]["broken"]:
        raise ValueError(f"topic {_t['name']}: KEYS needs one fix per code variant and at least one broken variant")
if len(KEYS) != len(TOPICS):
    raise ValueError(f"KEYS has entries for unknown topics: {sorted(set(KEYS) - {t['name'] for t in TOPICS})}")

# --------------------------------------------------------------------------------------------------------
# Generic parts of questions and of rejected answers.
# --------------------------------------------------------------------------------------------------------

Q_OPENERS = ["", "", "", "Hi all.", "Beginner here.", "Quick question.", "I've been stuck on this for a while.",
             "Sorry if this is a duplicate.", "New to [[lang]] here.", "Hello!", "This is probably a simple one."]
Q_CONTEXTS = ["", "", "This is for a small side project.", "It's part of a larger script at work.",
              "I need this for an assignment.", "I searched, but the answers I found were outdated.",
              "I'm running this on [[os]].", "The documentation didn't make it clear to me.",
              "I'd like to understand why, not just copy a fix.", "A colleague couldn't explain it either.",
              "All my tools are up to date ([[os]])."]
Q_CLOSERS = ["", "", "Thanks in advance!", "Any help is appreciated.", "What am I missing?",
             "Is there a cleaner way?", "What's the idiomatic way to do this?", "Thanks!",
             "A short explanation would be great.", "Any pointers?"]

GOOD_PREFIXES = ["", "", "", "", "Short answer: ", "You're close. ", "This is a common gotcha. ", "Good question. "]
GOOD_CLOSERS = ["", "", "", "", "", "Hope this helps.", "That should fix it.", "The documentation of [[tool]] covers "
                "this in more detail."]

BAD_DISMISSIVE = [
    "Just google it, there are hundreds of answers about [[thing]] already.",
    "This has been asked many times. Please search for [[thing]] before posting.",
    "Read the documentation. It's all in there.",
    "Why would you even want to do that? Sounds like an XY problem.",
    "Works on my machine. Can't reproduce.",
    "Not sure, but I remember something similar. Try a few things until it works.",
    "Ask ChatGPT, it knows this stuff.",
    "Closing as duplicate, this is basic [[lang]] stuff.",
    "You should really learn the basics of [[lang]] before asking here.",
    "Did you try turning it off and on again?",
    "Post your full code, nobody can help with this little information.",
    "Questions about [[thing]] come up every week here, the search box is your friend.",
    "I don't see the problem, your approach looks fine to me.",
    "Hard to tell. Maybe it's a [[lang]] bug, those happen.",
    "Just copy whatever the first tutorial about [[thing]] does.",
]
BAD_ENVIRONMENT = [
    "I think you should reinstall [[tool]]. That fixes most weird problems.",
    "Try restarting your computer and clearing all caches, then run it again.",
    "Upgrade [[tool]] and everything else to the latest version and it will probably go away.",
    "Your installation of [[tool]] is probably broken. Uninstall it and install an older version.",
    "This looks like a problem with [[os]], it doesn't happen on other systems.",
    "Maybe your antivirus is interfering, disable it and try again.",
    "Sounds like a corrupted cache. Delete every temp folder you can find and reboot.",
    "Downgrade [[tool]] by two major versions, newer releases broke a lot of things.",
    "Switch to a different editor, yours might be saving the file wrong.",
    "It's probably the network. Try again later when it's less busy.",
]
BAD_WRONG_FRAMES = [  # frames that fit any false claim, statement or instruction
    "[[wrong_cap]]", "Easy: [[wrong]]", "Simple, [[wrong]]", "[[wrong_cap]] That's what I always do.",
    "From my experience, [[wrong]]", "[[wrong_cap]] Nothing else is needed.",
    "[[wrong_cap]] Trust me, I've done this for years.", "Honestly, [[wrong]]",
]
BAD_STATEMENT_FRAMES = [  # frames that only fit a false statement ("X does Y"), not an instruction
    "As far as I know, [[wrong]]", "I'm pretty sure [[wrong]]", "The trick is that [[wrong]]",
    "Everyone knows that [[wrong]]", "I read somewhere that [[wrong]]", "It's simple: [[wrong]]",
]
# A false claim starting with one of these words is an instruction ("use X ..."), so statement frames don't fit.
IMPERATIVE_WORDS = {"add", "use", "run", "wrap", "call", "delete", "put", "install", "set", "return", "declare",
                    "always", "just"}
BAD_OFFTOPIC = [
    "Have you considered switching to [[other_lang]]? It handles this much better.",
    "You should use a framework for this instead of writing it yourself.",
    "This question is better suited for another site.",
    "Unrelated, but your variable names are terrible, you should fix that first.",
    "I had a similar issue with [[other_thing]] once, it turned out to be a config problem.",
    "Not an answer, but have you tried [[other_lang]]? I switched last year and never looked back.",
    "Are you sure the problem is [[thing]]? It's probably [[other_thing]], that's where my bugs usually are.",
    "I'd focus on [[other_thing]] first, that is much more important to get right.",
    "In [[other_lang]] this would be a one-liner, just saying.",
]
BAD_FILLER = [
    "Hope that helps somehow.",
    "At least that's how I remember it.",
    "Not 100% sure though.",
    "I haven't tested this.",
    "Maybe someone else knows more about [[thing]].",
    "It's been a while since I worked with [[lang]].",
    "That's all I can think of right now.",
    "Something like that.",
    "Either way, good luck.",
    "I might be wrong.",
]
RAMBLE = [
    "I ran into something like this a while ago, I think it was on an older machine, but I don't remember the "
    "details anymore.",
    "Honestly it's hard to say without seeing your whole setup, there could be a dozen different reasons.",
    "There are many ways to approach [[thing]] and people have strong opinions about each of them.",
    "In my experience these things usually sort themselves out once you update your tools.",
    "You might also want to look into best practices in general, because code quality matters a lot in the long "
    "run.",
    "Some people on forums say one thing and others say the exact opposite, so in the end it's really up to you.",
    "I'm not an expert in [[thing]], but I've dealt with it a few times over the years.",
    "Also, make sure your editor isn't doing something weird in the background, editors can be sneaky.",
    "It might be worth asking a senior developer on your team, they probably have seen this before.",
    "Whatever you do, write some tests, tests are always a good idea.",
    "I remember reading a long blog post about [[thing]] but I can't find it now.",
    "Performance could also be a factor here, or maybe not, it depends on a lot of things.",
    "Personally I'd rewrite the whole thing from scratch, sometimes that's faster than debugging.",
    "Anyway, these are just my two cents.",
    "Good luck, and let us know how it goes!",
    "It could also be a caching issue somewhere, caches cause all kinds of strange behaviour.",
]
LANGS = ["Python", "Go", "Rust", "JavaScript", "Java", "C", "SQL", "bash"]

PLACEHOLDER = re.compile(r"\[\[(\w+)\]\]")
CODE = "\x00code\x00"  # where the code block goes in an answer plan (see ``plan_good``)


def fill(text: str, slots: dict[str, str]) -> str:
    """Replace every ``[[name]]`` by ``slots[name]`` (KeyError on an unknown name, to catch typos)."""
    return PLACEHOLDER.sub(lambda m: slots[m.group(1)], text)


def join_sentences(parts: list[str]) -> str:
    return " ".join(p.strip() for p in parts if p.strip())


def capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------------------------------------
# Term matching: the rule of ``common/gold.py`` (``contains``), repeated here so the generator stays standalone.
# --------------------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def _char_class(c: str) -> str:
    return "digit" if c.isdigit() else "lower" if c.islower() else "upper" if c.isupper() else ""


def _continues(edge: str, neighbour: str) -> bool:
    """Whether ``neighbour`` continues the word that ends (or starts) with ``edge``: same letter case or digits,
    or a hyphen after a letter/digit (``--force`` is not ``--force-with-lease``). camelCase and snake_case
    joints are word boundaries, so ``User`` is found in ``loadUser`` and ``orders`` in ``n_orders``."""
    kind = _char_class(edge)
    return bool(kind) and bool(neighbour) and (_char_class(neighbour) == kind or neighbour == "-")


def contains(text: str, term: str) -> bool:
    """Case-sensitive substring test; any run of whitespace equals one space; not inside a longer word."""
    text, term = _WHITESPACE.sub(" ", text), _WHITESPACE.sub(" ", term)
    return _contains_normalized(text, term)


def _contains_normalized(text: str, term: str) -> bool:
    if not term.strip():
        return False
    start = text.find(term)
    while start != -1:
        end = start + len(term)
        if not _continues(term[0], text[start - 1] if start else "") and \
                not _continues(term[-1], text[end] if end < len(text) else ""):
            return True
        start = text.find(term, start + 1)
    return False


FENCE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def code_of(answer: str) -> str:
    """The contents of an answer's fenced code blocks, joined by newlines."""
    return "\n".join(FENCE_BLOCK.findall(answer))


def fix_coverage(answer: str, key: dict) -> float:
    """The largest share of the terms of a right fix of the answer key that the answer's code holds."""
    code = code_of(answer)
    return max(sum(contains(code, term) for term in alt) / len(alt) for alt in key["fix"])


def covers_fix(answer: str, key: dict) -> bool:
    """Whether the answer's code holds every term of at least one right fix of the answer key."""
    return fix_coverage(answer, key) == 1.0


# --------------------------------------------------------------------------------------------------------
# Questions and answers.
# --------------------------------------------------------------------------------------------------------


def sample_slots(rng: random.Random, t: dict) -> dict[str, str]:
    slots: dict[str, str] = {}
    for group in SLOT_GROUPS:
        slots.update(rng.choice(group))
    for name, (lo, hi) in NUMERIC_SLOTS.items():
        slots[name] = str(rng.randint(lo, hi))
    if slots["num2"] == slots["num"]:
        slots["num2"] = str(int(slots["num"]) + 1)
    slots["tool"], slots["lang"], slots["thing"] = t["tool"], t["lang"], t["thing"]
    slots["other_lang"] = rng.choice([x for x in LANGS if x != t["lang"]])
    slots["other_thing"] = rng.choice([o["thing"] for o in TOPICS if o["thing"] != t["thing"]])
    wrong = fill(rng.choice(t["wrong"]), slots)
    slots["wrong"], slots["wrong_cap"] = wrong, capitalize(wrong)
    frames = BAD_WRONG_FRAMES if wrong.split()[0] in IMPERATIVE_WORDS else BAD_WRONG_FRAMES + BAD_STATEMENT_FRAMES
    slots["wrong_framed"] = fill(rng.choice(frames), slots)
    return slots


def make_question(rng: random.Random, t: dict, slots: dict[str, str]) -> tuple[str, dict]:
    """A question text and the question spec it was built from (for matching code variants and reasons)."""
    spec = rng.choice(t["questions"])
    parts = [rng.choice(Q_OPENERS), spec["text"], rng.choice(Q_CONTEXTS), rng.choice(Q_CLOSERS)]
    text = fill(join_sentences(parts), slots)
    extra = [c for c in Q_CONTEXTS if c and fill(c, slots) not in text]
    while len(text.split()) < 20 and extra:  # keep questions in the 20-60 word range
        text = join_sentences([text, fill(extra.pop(rng.randrange(len(extra))), slots)])
    return text, spec


def code_block(lang: str, code: str) -> str:
    return f"```{lang}\n{code}\n```"


def allowed_variants(t: dict, spec: dict) -> list[int]:
    return list(spec["codes"]) if spec["codes"] is not None else list(range(len(t["codes"])))


def plan_good(rng: random.Random, t: dict, spec: dict, slots: dict[str, str], short: bool) -> dict:
    """The layout of a specific answer: intro, a code block (``CODE``), reasons; rendered by ``render``.

    The code variant is one that answers the question (``spec["codes"]``); the intro and the reasons are those
    of the topic that hold for every variant, plus those of the chosen variant and of the question. A plan can be
    rendered with the right code and names (the preferred answer), with another slot draw (wrong names) or with
    a broken variant of the code, so look-alike wrong answers share every sentence with the preferred one.
    """
    index = rng.choice(allowed_variants(t, spec))
    variant = t["codes"][index]
    intro = rng.choice(GOOD_PREFIXES) + rng.choice(t["intros"] + variant["intros"])
    reasons = spec["whys"] + variant["whys"] + t["whys"]
    plan = {"topic": t["name"], "variant": index, "lang": variant["lang"], "code": variant["code"]}
    if short:
        paras = [intro, CODE]
        if rng.random() < 0.3 or len(fill(intro + " " + variant["code"], slots).split()) < 25:
            paras.append(min(spec["whys"] or variant["whys"] or t["whys"], key=len))
        return dict(plan, paras=paras)
    # Question-specific reasons first when there are any: they answer the "why" the asker had.
    first = spec["whys"][:1]
    rest = [r for r in reasons if r not in first]
    whys = first + rng.sample(rest, k=min(len(rest), rng.choice([1, 2, 2, 3]) - len(first)))
    rng.shuffle(whys)
    if not whys:
        whys = [rng.choice(reasons)]
    layout = rng.random()
    if layout < 0.6:
        paras = [intro, CODE, join_sentences(whys)]
    elif layout < 0.85:
        paras = [join_sentences([intro, whys[0]]), CODE] + ([join_sentences(whys[1:])] if len(whys) > 1 else [])
    else:
        paras = [join_sentences([intro] + whys), CODE]
    closer = rng.choice(GOOD_CLOSERS)
    if closer:
        paras.append(closer)
    return dict(plan, paras=paras)


def render(plan: dict, slots: dict[str, str], lang: str | None = None, code: str | None = None) -> str:
    """The answer text of a plan, with its own code or with ``lang``/``code`` in its place."""
    block = code_block(lang or plan["lang"], plan["code"] if code is None else code)
    return fill("\n\n".join(plan["paras"]).replace(CODE, block), slots)


def make_bad(rng: random.Random, t: dict, slots: dict[str, str], shorter_than: str) -> tuple[str, str]:
    """A short code-free answer that is dismissive, blames the environment, is wrong or off-topic, and its kind.

    Padded with 0-2 filler sentences for variety, but kept shorter than ``shorter_than`` (the preferred answer),
    so that the share of pairs with a longer rejected answer is set by ``LONG_REJECTED_SHARE`` alone.
    """
    kind = rng.random()
    if kind < 0.25:
        main, kind = rng.choice(BAD_DISMISSIVE), "dismissive"
    elif kind < 0.45:
        main, kind = rng.choice(BAD_ENVIRONMENT), "environment"
    elif kind < 0.8:
        main, kind = "[[wrong_framed]]", "wrong_claim"
    else:
        main, kind = rng.choice(BAD_OFFTOPIC), "off_topic"
    extras = rng.sample(t["vague"] + BAD_FILLER + RAMBLE, k=rng.choice([0, 1, 1, 2]))
    parts = [main] + extras
    rng.shuffle(parts)
    text = fill(join_sentences(parts), slots)
    while len(text) >= len(shorter_than) and extras:
        parts.remove(extras.pop())
        text = fill(join_sentences(parts), slots)
    return text, kind


def make_rambling_bad(rng: random.Random, t: dict, slots: dict[str, str], longer_than: str) -> str:
    """A long, code-free answer that says nothing useful (or something wrong); longer than ``longer_than``."""
    core = ["[[wrong_framed]]", rng.choice(t["vague"])]
    if rng.random() < 0.5:
        core.append(rng.choice(BAD_ENVIRONMENT + BAD_OFFTOPIC))
    pool = RAMBLE[:]
    rng.shuffle(pool)
    parts = core + pool[:rng.randint(2, 4)]
    rng.shuffle(parts)
    text = fill(join_sentences(parts), slots)
    while len(text) <= len(longer_than) and pool[len(parts) - len(core):]:
        parts.append(pool[len(parts) - len(core)])
        text = fill(join_sentences(parts), slots)
    if rng.random() < 0.4:  # sometimes in two paragraphs
        sentences = re.split(r"(?<=[.!?]) ", text)
        cut = max(1, len(sentences) // 2)
        text = " ".join(sentences[:cut]) + "\n\n" + " ".join(sentences[cut:])
    return text


# --------------------------------------------------------------------------------------------------------
# Answer keys.
# --------------------------------------------------------------------------------------------------------

NUMERIC_SLOT_NAMES = set(NUMERIC_SLOTS)
SLOT_GROUP_OF = {name: group for group in SLOT_GROUPS for name in group[0]}
# Every code template of every topic (good and broken), unfilled: a slot value that occurs in it is a word
# that code uses anyway (``start``, ``done``, ``names`` ...), so it never counts as a foreign name.
ALL_CODE_TEXT = _WHITESPACE.sub(" ", "\n".join([c["code"] for t in TOPICS for c in t["codes"]] +
                                               [b["code"] for k in KEYS.values() for b in k["broken"]]))
_IN_ALL_CODE: dict[str, bool] = {}


def in_any_code(value: str) -> bool:
    if value not in _IN_ALL_CODE:
        _IN_ALL_CODE[value] = _contains_normalized(ALL_CODE_TEXT, _WHITESPACE.sub(" ", value))
    return _IN_ALL_CODE[value]


def topic_text(t: dict, spec: dict) -> str:
    """Every sentence and code template a preferred answer of this question can use, unfilled."""
    parts = t["intros"] + t["whys"] + spec["whys"] + [spec["text"]]
    for c in t["codes"]:
        parts += c["intros"] + c["whys"] + [c["code"]]
    return "\n".join(parts)


def name_slots(t: dict, spec: dict, slots: dict[str, str], question: str) -> list[str]:
    """Slots of the question that every right code uses: the names an answer must take from the question."""
    names = []
    for name in dict.fromkeys(PLACEHOLDER.findall(spec["text"])):
        value = slots[name]
        codes = [t["codes"][i]["code"] for i in allowed_variants(t, spec)]
        if all(f"[[{name}]]" in c and contains(fill(c, slots), value) for c in codes) and contains(question, value):
            if value not in [slots[n] for n in names]:
                names.append(name)
    return names


def make_key(t: dict, spec: dict, slots: dict[str, str], question: str) -> dict:
    """What a right answer to this question must contain and must not contain (see data/README.md)."""
    names = name_slots(t, spec, slots, question)
    spec_index = t["questions"].index(spec)
    known = _WHITESPACE.sub(" ", fill(topic_text(t, spec), slots))
    asked = _WHITESPACE.sub(" ", question)
    foreign: list[str] = []
    for name in names:
        if name in NUMERIC_SLOT_NAMES:
            continue
        for alt in SLOT_GROUP_OF[name]:
            value = alt[name]
            if value == slots[name] or value in foreign:
                continue
            if in_any_code(value) or _contains_normalized(asked, value) or _contains_normalized(known, value):
                continue
            foreign.append(value)
    forbidden = []
    for broken in KEYS[t["name"]]["broken"]:
        for marker in broken["markers"]:
            if fill(marker, slots) not in forbidden:
                forbidden.append(fill(marker, slots))
    variants = allowed_variants(t, spec)
    return {
        "topic": t["name"],
        "template": spec_index,
        "fix": [list(KEYS[t["name"]]["fix"][i]) for i in variants],
        "names": [slots[n] for n in names],
        "name_slots": names,
        "foreign_names": foreign,
        "forbidden": forbidden,
        "code_langs": list(dict.fromkeys(t["codes"][i]["lang"] for i in variants)),
    }


# --------------------------------------------------------------------------------------------------------
# Look-alike rejected answers: a fenced code block and about the length of the preferred answer, wrong in
# substance.
# --------------------------------------------------------------------------------------------------------


def similar_length(good: str, bad: str) -> bool:
    return abs(len(bad) - len(good)) <= LENGTH_TOLERANCE * len(good)


def redraw_names(rng: random.Random, slots: dict[str, str], names: list[str]) -> dict[str, str]:
    """A copy of ``slots`` where every name slot (and the slots linked to it) has another value."""
    other = dict(slots)
    for name in names:
        if name in NUMERIC_SLOT_NAMES:
            lo, hi = NUMERIC_SLOTS[name]
            value = slots[name]
            while value == slots[name] or value in (slots["num"], slots["num2"]):
                value = str(rng.randint(lo, hi))
            other[name] = value
        else:
            group = SLOT_GROUP_OF[name]
            other.update(rng.choice([alt for alt in group if all(alt[k] != slots[k] for k in alt)]))
    return other


def wrong_names_answer(rng, t, spec, slots, question, *, plan, good, key) -> str | None:
    """(i) The right fix, with the names of another slot draw (none of the question's names)."""
    for _attempt in range(30):
        other = redraw_names(rng, slots, key["name_slots"])
        bad = render(plan, other)
        if (not any(contains(bad, n) for n in key["names"]) and similar_length(good, bad)
                and len(question) + len(bad) <= MAX_PAIR_CHARS):
            return bad
    return None


def broken_answer(rng, t, spec, slots, question, *, plan, good, key) -> str | None:
    """(iii) The preferred answer with its code replaced by a subtly broken variant of the fix."""
    options = KEYS[t["name"]]["broken"][:]
    rng.shuffle(options)
    for broken in options:
        bad = render(plan, slots, broken["lang"], broken["code"])
        if (any(contains(bad, fill(m, slots)) for m in broken["markers"]) and bad != good
                and similar_length(good, bad) and len(question) + len(bad) <= MAX_PAIR_CHARS):
            return bad
    return None


_DONORS: dict[tuple, list[list[tuple[dict, dict]]]] = {}


def donors(t: dict, spec: dict, key: dict) -> list[list[tuple[dict, dict]]]:
    """Other topics' questions whose answers can be the wrong fix, best first: in tiers by how many of this
    question's name slots their code uses (so the wrong fix carries the question's names), then same language."""
    cache_key = (t["name"], key["template"], tuple(key["name_slots"]))
    if cache_key not in _DONORS:
        _DONORS[cache_key] = _donors(t, spec, key)
    return _DONORS[cache_key]


def _donors(t: dict, spec: dict, key: dict) -> list[list[tuple[dict, dict]]]:
    fence = {t["codes"][i]["lang"] for i in allowed_variants(t, spec)}
    tiers: dict[tuple[int, bool], list[tuple[dict, dict]]] = {}
    for t2 in TOPICS:
        if t2 is t:
            continue
        for spec2 in t2["questions"]:
            codes2 = [t2["codes"][i] for i in allowed_variants(t2, spec2)]
            overlap = sum(all(f"[[{n}]]" in c["code"] for c in codes2) for n in key["name_slots"])
            same_lang = any(c["lang"] in fence for c in codes2)
            tiers.setdefault((overlap, same_lang), []).append((t2, spec2))
    return [tiers[k] for k in sorted(tiers, reverse=True)]


def wrong_fix_answer(rng, t, spec, slots, question, *, plan, good, key) -> str | None:
    """(ii) The preferred answer of another topic's question, filled with this question's names; its code holds
    at most half of the terms of any right fix (both may use ``git add`` or ``re.findall``, not more)."""
    attempts = 0
    for tier in donors(t, spec, key):
        tier = tier[:]
        rng.shuffle(tier)
        for t2, spec2 in tier[:12]:
            attempts += 1
            if attempts > 40:
                return None
            slots2 = dict(slots, tool=t2["tool"], lang=t2["lang"], thing=t2["thing"])
            for short in (len(good) < 300, len(good) >= 300):
                bad = render(plan_good(rng, t2, spec2, slots2, short=short), slots2)
                if (similar_length(good, bad) and len(question) + len(bad) <= MAX_PAIR_CHARS
                        and fix_coverage(bad, key) <= MAX_WRONG_FIX_COVERAGE):
                    return bad
    return None


LOOKALIKE_MAKERS = {
    "lookalike_wrong_names": wrong_names_answer,
    "lookalike_wrong_fix": wrong_fix_answer,
    "lookalike_broken": broken_answer,
}
CLASSIC_KINDS = ["dismissive", "environment", "wrong_claim", "off_topic", "rambling"]
PAIR_KINDS = list(LOOKALIKE_MAKERS) + CLASSIC_KINDS


def qid_date(qid: int) -> str:
    """A posting date that grows with the qid, as on Stack Exchange (qids are assigned in order)."""
    span = DATE_LAST.toordinal() - DATE_FIRST.toordinal()
    day = DATE_FIRST.toordinal() + (qid - QID_FIRST) * span // (QID_LAST - QID_FIRST)
    return datetime.date.fromordinal(day).strftime("%Y/%m/%d")


def make_good_fitting(rng: random.Random, t: dict, spec: dict, slots: dict[str, str], question: str,
                      *, short: bool) -> tuple[dict, str]:
    """A preferred answer (plan and text) that keeps question + answer within MAX_PAIR_CHARS (about 256
    byte-level BPE tokens); redrawn if longer, short form as the last resort."""
    for _attempt in range(20):
        plan = plan_good(rng, t, spec, slots, short=short)
        good = render(plan, slots)
        if len(question) + len(good) <= MAX_PAIR_CHARS:
            return plan, good
    plan = plan_good(rng, t, spec, slots, short=True)
    return plan, render(plan, slots)


def make_row(rng: random.Random, t: dict, question: str, spec: dict, slots: dict[str, str], *, qid: int,
             kind: str) -> dict:
    """One row. ``kind`` is ``lookalike_*`` (falls back to another look-alike kind, then a classic one, if no
    wrong answer of that kind fits) or ``classic`` (a code-free bad answer; its kind is drawn)."""
    key = make_key(t, spec, slots, question)
    long_rejected = kind == "classic" and rng.random() < LONG_REJECTED_SHARE
    short_good = rng.random() < (0.6 if long_rejected else SHORT_GOOD_SHARE)
    plan, good = make_good_fitting(rng, t, spec, slots, question, short=short_good)
    bad = None
    if kind != "classic":
        order = [kind] + [k for k in LOOKALIKE_MAKERS if k != kind]
        if not key["names"]:
            order.remove("lookalike_wrong_names")
        for kind in order:
            bad = LOOKALIKE_MAKERS[kind](rng, t, spec, slots, question, plan=plan, good=good, key=key)
            if bad is not None:
                break
    if bad is None:
        for _attempt in range(20):
            if long_rejected:
                bad, kind = make_rambling_bad(rng, t, slots, good), "rambling"
            else:
                bad, kind = make_bad(rng, t, slots, good)
            if len(question) + len(bad) <= MAX_PAIR_CHARS:
                break
        else:
            bad, kind = make_bad(rng, t, slots, good)
    site = t["site"]
    return {
        "qid": qid,
        "question": question,
        "date": qid_date(qid),
        "metadata": [f"https://{site}/questions/{qid}", f"https://{site}",
                     f"https://{site}/users/{rng.randint(1000, 9_999_999)}/"],
        "response_j": good,
        "response_k": bad,
        "pair_kind": kind,
        "answer_key": key,
    }


def planned_kinds(rng: random.Random, size: int) -> list[str]:
    """The kinds asked for in a split: exact shares of each look-alike kind, the rest classic, shuffled."""
    kinds = [k for k, share in LOOKALIKE_SHARES.items() for _ in range(round(share * size))]
    kinds += ["classic"] * (size - len(kinds))
    rng.shuffle(kinds)
    return kinds


def new_question(rng: random.Random, t: dict, seen_questions: set[str], ok_core) -> tuple[str, dict, dict, str]:
    for _attempt in range(1000):
        slots = sample_slots(rng, t)
        question, spec = make_question(rng, t, slots)
        core = fill(spec["text"], slots)
        if question not in seen_questions and ok_core(core):
            return question, spec, slots, core
    raise RuntimeError(f"could not find a new question for topic {t['name']}")


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """Rows per split, topics assigned round-robin so every split covers every topic.

    Questions are distinct across all splits, and so are their cores (the filled question template without the
    opener, context and closer sentences): a core used in one split is never reused, reworded, in another, so
    the evaluation split is not a near-copy of the training splits.
    """
    rng = random.Random(seed)
    seen_questions: set[str] = set()
    core_split: dict[str, str] = {}
    seen_qids: set[int] = set()
    splits: dict[str, list[dict]] = {}
    offset = 0
    for split, size in SPLITS.items():
        rows = []
        kinds = planned_kinds(rng, size)
        for i in range(size):
            t = TOPICS[(offset + i) % len(TOPICS)]
            question, spec, slots, core = new_question(
                rng, t, seen_questions, lambda c, split=split: core_split.get(c, split) == split)
            seen_questions.add(question)
            core_split[core] = split
            qid = rng.randint(QID_FIRST, QID_LAST)
            while qid in seen_qids:
                qid = rng.randint(QID_FIRST, QID_LAST)
            seen_qids.add(qid)
            row = make_row(rng, t, question, spec, slots, qid=qid, kind=kinds[i])
            row["_topic"], row["_core"] = t["name"], core
            rows.append(row)
        offset += size
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def pretrain_corpus(splits: dict[str, list[dict]], seed: int = SEED, extra: int = PRETRAIN_EXTRA) -> list[dict]:
    """Documents ``Question: ...\\n\\nAnswer: ...`` (common/prompts.py) for pretraining a tiny base model.

    The questions and preferred answers of ``finetune`` and ``reward``, plus ``extra`` new questions (new slot
    draws of the same templates, so the model sees the same fix with many different names and learns to copy
    them from the question) with their preferred answers. Never a rejected answer, and no question or question
    core of ``evaluation`` or ``rl``. Shuffled.
    """
    rng = random.Random(seed + 1)
    held_out_cores = {r["_core"] for s in HELD_OUT for r in splits[s]}
    seen = {r["question"] for rows in splits.values() for r in rows}
    docs = [{"text": format_example(r["question"], r["response_j"]), "source": split, "_core": r["_core"]}
            for split in PRETRAIN_SPLITS for r in splits[split]]
    for i in range(extra):
        t = TOPICS[i % len(TOPICS)]
        question, spec, slots, core = new_question(rng, t, seen, lambda c: c not in held_out_cores)
        seen.add(question)
        _plan, good = make_good_fitting(rng, t, spec, slots, question, short=rng.random() < SHORT_GOOD_SHARE)
        docs.append({"text": format_example(question, good), "source": "extra", "_core": core})
    rng.shuffle(docs)
    return docs


def corpus_question(text: str) -> str:
    """The question of a pretraining document (inverse of ``format_example``)."""
    head, sep, _answer = text.partition("\n\nAnswer: ")
    if not sep or not head.startswith("Question: "):
        raise AssertionError(f"pretraining document not in the prompt format: {text[:80]!r}")
    return head[len("Question: "):]


KEY_FIELDS = {"topic": str, "template": int, "fix": list, "names": list, "name_slots": list,
              "foreign_names": list, "forbidden": list, "code_langs": list}


def check_key(where: str, key) -> None:
    if not isinstance(key, dict) or list(key) != list(KEY_FIELDS):
        raise AssertionError(f"{where}: answer_key must be a dict with the fields {list(KEY_FIELDS)}: {key!r}")
    for name, typ in KEY_FIELDS.items():
        if not isinstance(key[name], typ):
            raise AssertionError(f"{where}: answer_key.{name} must be a {typ.__name__}")
    lists = [key[f] for f in ("names", "name_slots", "foreign_names", "forbidden", "code_langs")] + key["fix"]
    if not key["fix"] or not all(isinstance(x, list) and x for x in key["fix"]) or \
            not all(isinstance(s, str) and s for lst in lists for s in lst):
        raise AssertionError(f"{where}: answer_key lists must hold non-empty strings (fix: non-empty lists)")


def check(splits: dict[str, list[dict]]) -> None:
    """Raise if a split is too small, a field is missing or empty, a pair is not of its kind, or questions/qids
    overlap across splits."""
    minimum = {"finetune": 2000, "reward": 2000, "evaluation": 300, "rl": 500}
    fields = {"qid": int, "question": str, "date": str, "metadata": list, "response_j": str, "response_k": str,
              "pair_kind": str, "answer_key": dict}
    question_split: dict[str, str] = {}
    qid_split: dict[int, str] = {}
    for split, rows in splits.items():
        if len(rows) < minimum[split]:
            raise AssertionError(f"{split}: {len(rows)} rows, need at least {minimum[split]}")
        for row in rows:
            where = f"{split} qid {row.get('qid')}"
            for name, typ in fields.items():
                value = row.get(name)
                if not isinstance(value, typ) or (typ is str and not value.strip()) or (typ is list and not value):
                    raise AssertionError(f"{where}: bad field {name!r}: {value!r}")
            if not all(isinstance(m, str) and m for m in row["metadata"]):
                raise AssertionError(f"{where}: metadata must be non-empty strings")
            check_key(where, row["answer_key"])
            check_pair(where, row)
            if max(len(row["response_j"]), len(row["response_k"])) + len(row["question"]) > MAX_PAIR_CHARS:
                raise AssertionError(f"{where}: question + answer longer than {MAX_PAIR_CHARS} chars")
            if PLACEHOLDER.search(row["question"] + row["response_j"] + row["response_k"]) or \
                    CODE in row["response_j"] + row["response_k"]:
                raise AssertionError(f"{where}: unfilled placeholder")
            if row["question"] in question_split:
                raise AssertionError(f"question of qid {row['qid']} appears twice ({question_split[row['question']]} "
                                     f"and {split}): {row['question'][:80]!r}")
            if row["qid"] in qid_split:
                raise AssertionError(f"qid {row['qid']} appears twice ({qid_split[row['qid']]} and {split})")
            question_split[row["question"]] = split
            qid_split[row["qid"]] = split
        lookalike = sum(r["pair_kind"].startswith("lookalike_") for r in rows) / len(rows)
        if split in ("reward", "evaluation") and lookalike < MIN_LOOKALIKE_SHARE:
            raise AssertionError(f"{split}: only {lookalike:.1%} look-alike pairs, need {MIN_LOOKALIKE_SHARE:.0%}")
    # The property the reward-model stage relies on, stated explicitly.
    eval_questions = {r["question"] for r in splits["evaluation"]}
    if any(r["question"] in eval_questions for r in splits["reward"]):
        raise AssertionError("an evaluation question appears in the reward split")


def check_pair(where: str, row: dict) -> None:
    """The preferred answer satisfies its answer key; the rejected one is of its kind, and wrong in substance."""
    good, bad, key, kind = row["response_j"], row["response_k"], row["answer_key"], row["pair_kind"]
    if kind not in PAIR_KINDS:
        raise AssertionError(f"{where}: unknown pair_kind {kind!r}")
    if good == bad:
        raise AssertionError(f"{where}: identical responses")
    if "```" not in good or not covers_fix(good, key):
        raise AssertionError(f"{where}: the preferred answer's code holds none of the key's fixes")
    if not all(contains(good, n) for n in key["names"]):
        raise AssertionError(f"{where}: the preferred answer lacks a name of the question")
    if not all(contains(row["question"], n) for n in key["names"]):
        raise AssertionError(f"{where}: a name of the key is not in the question")
    found = [m for m in key["forbidden"] if contains(good, m)]
    found += [n for n in key["foreign_names"] if contains(code_of(good), n)]
    if found:
        raise AssertionError(f"{where}: the preferred answer contains forbidden content {found}")
    if not kind.startswith("lookalike_"):
        if "```" in bad:
            raise AssertionError(f"{where}: a {kind} rejected answer must have no code block")
        return
    if bad.count("```") != 2 or not code_of(bad).strip():
        raise AssertionError(f"{where}: a look-alike rejected answer has exactly one code block")
    if not similar_length(good, bad):
        raise AssertionError(f"{where}: look-alike answers differ by more than {LENGTH_TOLERANCE:.0%} in length")
    if kind == "lookalike_wrong_names" and (not key["names"] or any(contains(bad, n) for n in key["names"])
                                            or not covers_fix(bad, key)):
        raise AssertionError(f"{where}: a wrong-names answer has the right fix and none of the question's names")
    if kind == "lookalike_wrong_fix" and fix_coverage(bad, key) > MAX_WRONG_FIX_COVERAGE:
        raise AssertionError(f"{where}: a wrong-fix answer holds more than half of a right fix's terms")
    if kind == "lookalike_broken" and not any(contains(bad, m) for m in key["forbidden"]):
        raise AssertionError(f"{where}: a broken answer contains none of the key's forbidden markers")


def check_corpus(docs: list[dict], splits: dict[str, list[dict]]) -> None:
    """The pretraining corpus holds no question of a held-out split, and a question of the splits only with its
    preferred answer (a wrong-fix rejected answer is some other question's right answer, so its text may occur,
    but never as the answer to the question it was rejected for)."""
    held_out = {r["question"] for s in HELD_OUT for r in splits[s]}
    preferred = {r["question"]: r["response_j"] for rows in splits.values() for r in rows}
    for doc in docs:
        if set(doc) - {"_core"} != {"text", "source"} or doc["source"] not in PRETRAIN_SPLITS + ("extra",):
            raise AssertionError(f"bad pretraining document {doc!r}")
        question = corpus_question(doc["text"])
        if question in held_out:
            raise AssertionError(f"pretraining corpus holds a held-out question: {question[:80]!r}")
        if question in preferred and doc["text"] != format_example(question, preferred[question]):
            raise AssertionError(f"pretraining corpus: not the preferred answer of {question[:80]!r}")
    held_out_cores = {r["_core"] for s in HELD_OUT for r in splits[s] if "_core" in r}
    if any(doc.get("_core") in held_out_cores for doc in docs):
        raise AssertionError("pretraining corpus reuses a held-out question core")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            public = {k: v for k, v in row.items() if not k.startswith("_")}
            f.write(json.dumps(public, ensure_ascii=False) + "\n")
    return path


def write(splits: dict[str, list[dict]], out_dir: Path) -> dict[str, Path]:
    return {split: write_jsonl(out_dir / split / "train.jsonl", rows) for split, rows in splits.items()}


# The same rows in the layouts of TRL's dataset docs (common/layouts.py reads them in every stage). `trl`: the
# standard form, the prompt as the literal text before the answer (this project's template, so every stage sees the
# same tokens as from StackLLaMA's columns); `chat`: the conversational form, one user and one assistant message.
FORMATS = ("stackllama", "trl", "chat")
SPLIT_LAYOUT = {"finetune": "sft", "reward": "pairs", "evaluation": "pairs", "rl": "prompts"}


def in_format(row: dict, split: str, fmt: str) -> dict:
    """``row`` of ``split`` in ``fmt``: the layout's columns first, then the row's other fields (``qid``,
    ``pair_kind``, ``answer_key``, ...) without StackLLaMA's."""
    if fmt == "stackllama":
        return row
    q, good, bad = row["question"], row["response_j"], row["response_k"]
    if fmt == "trl":
        prompt, chosen, rejected = format_prompt(q), good, bad
    else:
        prompt = [{"role": "user", "content": q}]
        chosen, rejected = [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}]
    layout = SPLIT_LAYOUT[split]
    if layout == "sft":
        out = {"messages": prompt + chosen} if fmt == "chat" else {"prompt": prompt, "completion": chosen}
    elif layout == "pairs":
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        out = {"prompt": prompt}
    return {**out, **{k: v for k, v in row.items() if k not in ("question", "response_j", "response_k")}}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def quantiles(values: list[float], qs=(0.0, 0.05, 0.5, 0.95, 1.0)) -> list[float]:
    values = sorted(values)
    return [values[min(len(values) - 1, int(q * len(values)))] for q in qs]


def report(splits: dict[str, list[dict]], docs: list[dict]) -> list[str]:
    """The printed summary: pair kinds per split, length figures, the pretraining corpus."""
    lines = [f"{'pair_kind':<22}" + "".join(f"{s:>17}" for s in splits)]
    for kind in PAIR_KINDS + ["(look-alike, all)"]:
        cells = []
        for rows in splits.values():
            n = sum(r["pair_kind"] == kind or (kind.startswith("(") and r["pair_kind"].startswith("lookalike_"))
                    for r in rows)
            cells.append(f"{n:>6} ({n / len(rows):6.1%})")
        lines.append(f"{kind:<22}" + "".join(f"{c:>17}" for c in cells))
    pairs = [r for rows in splits.values() for r in rows]
    look = [r for r in pairs if r["pair_kind"].startswith("lookalike_")]
    ratios = [len(r["response_k"]) / len(r["response_j"]) for r in look]
    q = quantiles(ratios)
    lines.append(f"look-alike pairs: len(rejected)/len(preferred) min {q[0]:.2f}, p5 {q[1]:.2f}, median {q[2]:.2f}, "
                 f"p95 {q[3]:.2f}, max {q[4]:.2f}; "
                 f"within 10%: {sum(abs(x - 1) <= 0.1 for x in ratios) / len(ratios):.1%}; "
                 f"rejected longer: {sum(x > 1 for x in ratios) / len(ratios):.1%}")
    wrong_fix = [r for r in look if r["pair_kind"] == "lookalike_wrong_fix"]
    with_names = sum(all(contains(r["response_k"], n) for n in r["answer_key"]["names"]) for r in wrong_fix)
    lines.append(f"wrong-fix answers holding every name of the question: {with_names / len(wrong_fix):.1%}")
    longer = sum(len(r["response_k"]) > len(r["response_j"]) for r in pairs)
    lines.append(f"rejected answer longer than preferred: {longer / len(pairs):.1%} of {len(pairs)} pairs")
    sources = {s: sum(d["source"] == s for d in docs) for s in PRETRAIN_SPLITS + ("extra",)}
    lines.append(f"pretraining corpus: {len(docs)} documents ({', '.join(f'{k} {v}' for k, v in sources.items())}), "
                 f"{sum(len(d['text']) for d in docs) / 1e6:.2f}M characters")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write finetune/, reward/, evaluation/, rl/, pretrain/ into "
                             "(default: this folder)")
    parser.add_argument("--pretrain_extra", type=int, default=PRETRAIN_EXTRA,
                        help=f"new questions added to the pretraining corpus (default {PRETRAIN_EXTRA})")
    parser.add_argument("--format", choices=FORMATS, default="stackllama",
                        help="stackllama (default: question/response_j/response_k, in place), trl (prompt/completion, "
                             "prompt/chosen/rejected, prompt: strings) or chat (the same as lists of messages; "
                             "messages for SFT); trl and chat write the four splits to --out_dir (default "
                             "runs/data/FORMAT), no pretraining corpus")
    parser.add_argument("--extra_pairs", type=int, default=0,
                        help="write a folder (--out_dir, default runs/data/reward_plus_N) whose reward/ holds the "
                             "sample pairs and N new ones from further draws (no question of the sample data, no "
                             "question core of evaluation or rl) and whose evaluation/ is the sample data's")
    args = parser.parse_args(argv)
    if args.extra_pairs:
        return write_extra_pairs(args)
    if args.format != "stackllama":
        return write_format(args)

    if len(TOPICS) < 30:
        raise AssertionError(f"only {len(TOPICS)} topics")
    splits = generate(args.seed)
    for split, rows in splits.items():
        covered = len({r["_topic"] for r in rows})
        if covered != len(TOPICS):
            raise AssertionError(f"{split}: covers {covered} of {len(TOPICS)} topics")
    core_splits: dict[str, set[str]] = {}
    for split, rows in splits.items():
        for r in rows:
            core_splits.setdefault(r["_core"], set()).add(split)
    if any(len(v) > 1 for v in core_splits.values()):
        raise AssertionError("a question template filled with the same values appears in two splits")
    check(splits)
    docs = pretrain_corpus(splits, args.seed, args.pretrain_extra)
    check_corpus(docs, splits)
    paths = write(splits, args.out_dir)
    paths["pretrain"] = write_jsonl(args.out_dir / "pretrain" / "train.jsonl", docs)
    # Check again what actually landed on disk, as the training stages will read it.
    on_disk = {split: read_jsonl(paths[split]) for split in splits}
    check(on_disk)
    check_corpus(read_jsonl(paths["pretrain"]), on_disk)

    for split, path in paths.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        n = len(docs) if split == "pretrain" else len(splits[split])
        print(f"{split:<11} {n:>5} rows  {path}  sha256 {digest}")
    print(f"topics: {len(TOPICS)}")
    for line in report(splits, docs):
        print(line)
    return 0


def write_format(args) -> int:
    """``--format trl|chat``: the sample data (the same draw) in that layout, checked as the stackllama files are."""
    out_dir = args.out_dir
    if out_dir == Path(__file__).resolve().parent:  # the default: never over the committed sample data
        out_dir = Path(__file__).resolve().parent.parent / "runs" / "data" / args.format
    splits = generate(args.seed)
    check(splits)
    for split, rows in splits.items():
        path = write_jsonl(out_dir / split / "train.jsonl", [in_format(r, split, args.format) for r in rows])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"{split:<11} {len(rows):>5} rows  {path}  sha256 {digest}  ({SPLIT_LAYOUT[split]}: "
              f"{', '.join(k for k in in_format(rows[0], split, args.format) if k not in rows[0])})")
    return 0


def extra_pairs(n: int, seed: int = SEED) -> list[dict]:
    """``n`` reward-model pairs beyond the sample data: the rows of new draws of the generator (seeds ``seed + 1000``,
    ``seed + 2000``, ...), without any question of the sample data and without any question core of its held-out
    splits (evaluation, rl), so that more training pairs never leak the evaluation. Shuffled; kinds in the
    generator's shares."""
    base = generate(seed)
    held_out_cores = {r["_core"] for split in HELD_OUT for r in base[split]}
    seen = {r["question"] for rows in base.values() for r in rows}
    rows, draw = [], 0
    while len(rows) < n:
        draw += 1
        for split_rows in generate(seed + 1000 * draw).values():
            for r in split_rows:
                if r["_core"] not in held_out_cores and r["question"] not in seen:
                    seen.add(r["question"])
                    rows.append({k: v for k, v in r.items() if not k.startswith("_")})
    random.Random(seed + draw).shuffle(rows)
    return rows[:n]


def write_extra_pairs(args) -> int:
    """``--extra_pairs N``: a data folder whose reward/ holds the sample data's pairs and N new ones (checked as the
    sample data is), and whose evaluation/ is the sample data's: ``--dataset_name OUT_DIR`` for the reward model."""
    out_dir = args.out_dir
    if out_dir == Path(__file__).resolve().parent:  # the default: never over the committed sample data
        out_dir = Path(__file__).resolve().parent.parent / "runs" / "data" / f"reward_plus_{args.extra_pairs}"
    here = Path(__file__).resolve().parent
    sample = read_jsonl(here / "reward" / "train.jsonl")
    new = extra_pairs(args.extra_pairs, args.seed)
    for i, row in enumerate(new):
        check_pair(f"extra pair {i}", row)
    rows = sample + new
    random.Random(args.seed).shuffle(rows)
    paths = [write_jsonl(out_dir / "reward" / "train.jsonl", rows),
             write_jsonl(out_dir / "evaluation" / "train.jsonl", read_jsonl(here / "evaluation" / "train.jsonl"))]
    for path in paths:
        print(f"{path}  {sum(1 for _ in open(path, encoding='utf-8'))} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
