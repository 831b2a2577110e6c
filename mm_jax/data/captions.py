"""Caption hygiene for the identity fusion: every training caption needs a class word.

Magic Mirror fuses the identity into the text at the caption's class word (``mm_jax.text.CLASS_WORDS``,
the one list), so a caption without one trains without the fusion. The builders check each caption
and count those that lack one; an optional rewrite (an ordered rule set) can repair them first:

    rules = load_rules("default")            # or a JSON file: [{"name", "pattern", "replacement"}, ...]
    check = fix_caption("Someone rides a bike", rules)
    check.caption == "a person rides a bike"; check.had_class_word is False; check.rule == "someone"

A rule is a case-insensitive regular expression and its replacement (``re.sub``, first match only).
Rules are tried in order on the original caption; the first whose result names a class word is
kept. Captions that already have one are never touched.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

from mm_jax.text import CLASS_WORDS, has_class_word


@dataclasses.dataclass(frozen=True)
class CaptionRule:
    name: str
    pattern: str       # regular expression, matched case-insensitively
    replacement: str   # re.sub replacement for the first match


# "a person" for the words captioners use for an unnamed subject, else "a person, " in front.
DEFAULT_RULES = (
    CaptionRule("someone", r"\b(?:someone|somebody|an individual|a human being|a human|a figure)\b", "a person"),
    CaptionRule("individuals", r"\b(?:individuals|humans|persons)\b", "people"),
    CaptionRule("prefix", r"^", "a person, "),
)


@dataclasses.dataclass(frozen=True)
class CaptionCheck:
    caption: str           # the caption to train on (rewritten or not)
    had_class_word: bool   # whether the original caption named a class word
    rule: str | None       # the rule that supplied one, None when none was needed or none worked

    @property
    def ok(self) -> bool:
        return self.had_class_word or self.rule is not None


def fix_caption(caption: str, rules: Sequence[CaptionRule] = (), words: Sequence[str] = CLASS_WORDS) -> CaptionCheck:
    """``caption`` as it will be trained on: unchanged when it has a class word, else the first
    rule's rewrite that has one (``rule`` names it), else unchanged with ``ok`` False."""
    if has_class_word(caption, words):
        return CaptionCheck(caption, True, None)
    for rule in rules:
        new = re.sub(rule.pattern, rule.replacement, caption, count=1, flags=re.IGNORECASE).strip()
        if new != caption and has_class_word(new, words):
            return CaptionCheck(new, False, rule.name)
    return CaptionCheck(caption, False, None)


def load_rules(spec: str | Path | None) -> tuple[CaptionRule, ...]:
    """``"none"``/None: no rewrite; ``"default"``: ``DEFAULT_RULES``; else a JSON file with a list
    of ``{"name", "pattern", "replacement"}``. Errors name the file and the bad entry."""
    if spec is None or str(spec) == "none":
        return ()
    if str(spec) == "default":
        return DEFAULT_RULES
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--caption-rules {spec}: not 'none', 'default' or a JSON rules file")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--caption-rules {path}: not JSON ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"--caption-rules {path}: expected a list of {{name, pattern, replacement}}")
    rules = []
    for i, e in enumerate(entries):
        try:
            rule = CaptionRule(str(e["name"]), str(e["pattern"]), str(e["replacement"]))
            re.compile(rule.pattern)
        except (KeyError, TypeError, re.error) as err:
            raise ValueError(f"--caption-rules {path}: entry {i} ({e!r}) is not a valid rule: {err}") from None
        rules.append(rule)
    return tuple(rules)


def rules_to_json(rules: Sequence[CaptionRule]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rules]
