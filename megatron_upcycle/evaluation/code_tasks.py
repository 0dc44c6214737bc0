"""Downstream items about Python code, drawn from held-out source files.

Pure functions: (files, seed) -> items. Each item is a dict the harness reads
through its task YAML (see ``task_files``). Three tasks:

  code_next_line   up to K preceding lines; choose the true next line among 4.
                   Distractors are lines of the same file at other positions.
                   Random baseline 1/4.
  code_identifier  LAMBADA-style: the context ends just before the final
                   identifier of a line, an identifier that occurred earlier in
                   the context; scored by the harness's greedy exact match
                   (``acc`` of a loglikelihood task). Random baseline 0.
  code_closure     a line that ends by closing two or more brackets (then
                   perhaps ``:`` or ``,``), brackets found by Python's tokenizer:
                   choose the right closing sequence among 4 of the same length. Any other
                   sequence of that length mismatches an open bracket, so every
                   distractor is a syntax error. Random baseline 1/4.

Decontamination: an item is dropped when the last ``WINDOW_LINES`` lines of its
text (context + answer) occur anywhere in the training text, so the whole item
never does either (tests/test_eval_tasks.py checks both against the training split).
"""
from __future__ import annotations

import keyword
import random
import re
from dataclasses import dataclass
from itertools import product

CONTEXT_LINES = 8            # K: preceding lines shown
WINDOW_LINES = 4             # lines of an item's end that must not occur in the training text
ITEMS_PER_TASK = 300
MAX_ITEMS_PER_FILE = 30      # no single file dominates a task
CHOICES = 4
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_OPENERS = {v: k for k, v in _CLOSERS.items()}
_FINAL_IDENTIFIER = re.compile(r"^(.*?)([A-Za-z_][A-Za-z0-9_]*)$")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRIVIAL_IDENTIFIERS = frozenset({"self", "cls"}) | frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)


@dataclass(frozen=True)
class CodeFile:
    key: str       # path relative to the corpus root
    text: str


def _scan(text: str) -> tuple[set[int], list[tuple[int, int, str, str]]]:
    """(indices of lines holding code only, closing runs) from Python's own tokenizer.

    A code line touches no string or comment token. A closing run is (line index,
    column, closers, suffix): two or more closing brackets that end a line (then
    an optional ``:`` or ``,``), with the brackets they close known from the
    tokens, so brackets opened lines earlier and brackets inside strings are right.
    """
    import io
    import tokenize

    lines = text.split("\n")
    not_code: set[int] = set()
    runs: list[tuple[int, int, str, str]] = []
    stack: list[str] = []
    line_tokens: list[tuple[tokenize.TokenInfo, tuple[str, ...]]] = []

    def close_line() -> None:
        ops = [(tok, before) for tok, before in line_tokens if tok.type not in (tokenize.NL, tokenize.NEWLINE,
                                                                               tokenize.COMMENT)]
        suffix = ""
        if ops and ops[-1][0].string in (":", ","):
            suffix = ops.pop()[0].string
        run = []
        while ops and ops[-1][0].string in _CLOSERS:
            run.insert(0, ops.pop())
        if len(run) >= 2:
            row, col = run[0][0].start
            closers = "".join(tok.string for tok, _ in run)
            before = run[0][1]
            if lines[row - 1][col:].rstrip() == closers + suffix and len(before) >= len(closers):
                runs.append((row - 1, col, closers, suffix))
        line_tokens.clear()

    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.STRING, tokenize.COMMENT) or tok.type not in tokenize.tok_name or \
                    tokenize.tok_name[tok.type].startswith("FSTRING"):
                not_code.update(range(tok.start[0] - 1, tok.end[0]))
            before = tuple(stack)
            if tok.type == tokenize.OP and tok.string in _OPENERS:
                stack.append(tok.string)
            elif tok.type == tokenize.OP and tok.string in _CLOSERS:
                if not stack or stack[-1] != _CLOSERS[tok.string]:
                    return set(), []
                stack.pop()
            if line_tokens and tok.start[0] != line_tokens[-1][0].start[0]:
                close_line()
            line_tokens.append((tok, before))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return set(), []  # not Python 3: no items from this file
    code = {i for i, line in enumerate(lines) if line.strip() and i not in not_code}
    return code, runs


def _context(lines: list[str], i: int) -> str:
    return "".join(line + "\n" for line in lines[max(0, i - CONTEXT_LINES):i])


def item_text(item: dict) -> str:
    """What the model reads when the item is answered correctly: context + gold answer."""
    if "choices" in item:
        return item["context"] + item["choices"][item["label"]]
    return item["context"] + item["target"]


def _tail(text: str, lines: int = WINDOW_LINES) -> str:
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


class Decontaminator:
    """Refuses an item whose last lines occur in the training text."""

    def __init__(self, training_text: str) -> None:
        self.training_text = training_text

    def clean(self, item: dict) -> bool:
        return _tail(item_text(item)) not in self.training_text


def next_line_items(file: CodeFile, rng: random.Random) -> list[dict]:
    lines = file.text.split("\n")
    code = _scan(file.text)[0]
    usable = sorted(i for i in code if len(lines[i].strip()) >= 4)
    items = []
    for i in usable:
        if i < 2 or not any(line.strip() for line in lines[max(0, i - CONTEXT_LINES):i]):
            continue
        gold = lines[i]
        distractors: list[str] = []
        for _ in range(50):  # random other positions until three distinct lines differ from the gold one
            j = rng.choice(usable)
            line = lines[j]
            if abs(j - i) > CONTEXT_LINES and all(
                    line.strip() != other.strip() for other in [gold, *distractors]):
                distractors.append(line)
                if len(distractors) == CHOICES - 1:
                    break
        if len(distractors) < CHOICES - 1:
            continue
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [gold] + distractors[label:]
        items.append({"context": _context(lines, i), "choices": choices, "label": label,
                      "source": f"{file.key}:{i + 1}"})
    return items


def identifier_items(file: CodeFile, rng: random.Random) -> list[dict]:
    lines = file.text.split("\n")
    items = []
    for i in sorted(_scan(file.text)[0]):
        line = lines[i]
        if i < 1:
            continue
        match = _FINAL_IDENTIFIER.match(line.rstrip())
        if match is None:
            continue
        prefix, name = match.groups()
        if len(name) < 2 or name in _TRIVIAL_IDENTIFIERS or not prefix.strip():
            continue
        context = _context(lines, i) + prefix
        if name not in set(_WORD.findall(context)):
            continue
        items.append({"context": context, "target": name, "source": f"{file.key}:{i + 1}"})
    return items


def closure_items(file: CodeFile, rng: random.Random) -> list[dict]:
    lines = file.text.split("\n")
    items = []
    for i, col, closers, suffix in _scan(file.text)[1]:
        if i < 1:
            continue
        wrong = ["".join(seq) for seq in product(")]}", repeat=len(closers)) if "".join(seq) != closers]
        distractors = [seq + suffix for seq in rng.sample(wrong, CHOICES - 1)]
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [closers + suffix] + distractors[label:]
        items.append({"context": _context(lines, i) + lines[i][:col], "choices": choices, "label": label,
                      "source": f"{file.key}:{i + 1}"})
    return items


BUILDERS = {"code_next_line": next_line_items, "code_identifier": identifier_items, "code_closure": closure_items}


def build_items(task: str, files: list[CodeFile], decontaminator: Decontaminator, seed: int,
                count: int = ITEMS_PER_TASK) -> list[dict]:
    """``count`` clean items of ``task``, at most MAX_ITEMS_PER_FILE per file, in a seeded order."""
    rng = random.Random(f"{task}:{seed}")
    per_file: list[list[dict]] = []
    for file in sorted(files, key=lambda f: f.key):
        candidates = BUILDERS[task](file, rng)
        rng.shuffle(candidates)
        kept = []
        for item in candidates:
            if len(kept) == MAX_ITEMS_PER_FILE:
                break
            if decontaminator.clean(item):
                kept.append(item)
        per_file.append(kept)
    # Round-robin over files so that a cut at ``count`` keeps the spread across files.
    items: list[dict] = []
    for position in range(MAX_ITEMS_PER_FILE):
        for kept in per_file:
            if position < len(kept) and len(items) < count:
                items.append(kept[position])
    return items
