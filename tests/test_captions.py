"""Caption hygiene: the class-word check uses the one list (mm_jax.text), the rule set rewrites
only captions without a class word, in order, and the builder counts what it found and did."""
import json

import pytest

from mm_jax.data.captions import DEFAULT_RULES, CaptionRule, fix_caption, load_rules
from mm_jax.text import CLASS_WORDS


def test_a_caption_with_a_class_word_is_never_rewritten():
    for word in CLASS_WORDS:
        c = fix_caption(f"the {word} smiles at someone", DEFAULT_RULES)
        assert c.caption == f"the {word} smiles at someone" and c.had_class_word and c.rule is None and c.ok


def test_the_default_rules_insert_a_person_in_order():
    assert fix_caption("Someone rides a bike", DEFAULT_RULES).caption == "a person rides a bike"
    assert fix_caption("two individuals dance", DEFAULT_RULES).rule == "individuals"
    c = fix_caption("close-up portrait, studio light", DEFAULT_RULES)
    assert (c.caption, c.had_class_word, c.rule, c.ok) == ("a person, close-up portrait, studio light", False,
                                                          "prefix", True)
    none = fix_caption("close-up portrait", ())
    assert not none.ok and none.caption == "close-up portrait"


def test_rules_load_from_a_json_file_and_bad_ones_name_the_entry(tmp_path):
    good = tmp_path / "rules.json"
    good.write_text(json.dumps([{"name": "player", "pattern": r"\bplayer\b", "replacement": "man"}]))
    rules = load_rules(good)
    assert rules == (CaptionRule("player", r"\bplayer\b", "man"),)
    assert fix_caption("a player kicks a ball", rules).caption == "a man kicks a ball"
    assert load_rules("none") == () and load_rules("default") == DEFAULT_RULES
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x", "pattern": "(", "replacement": ""}]))
    with pytest.raises(ValueError, match="entry 0"):
        load_rules(bad)
    with pytest.raises(ValueError, match="not 'none', 'default' or a JSON rules file"):
        load_rules(tmp_path / "missing.json")


def test_the_builder_counts_captions_without_a_class_word_and_the_rewrites(tmp_path):
    from mm_jax.data.build import build_dataset
    from mm_jax.demo.synthetic import make_demo_source
    from mm_jax.demo.assets import standin_faces

    src = make_demo_source(tmp_path / "src", num_clips=0, num_images=3, seed=2)
    lines = [json.loads(x) for x in (src / "captions.jsonl").read_text().splitlines()]
    lines[0]["caption"], lines[1]["caption"] = "someone waves", "a sunny street"
    (src / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pack = standin_faces(tmp_path)
    plain = build_dataset(src, tmp_path / "plain", pack, progress=False)
    assert plain["captions"] == {"without_class_word": 2, "rewritten": {}, "dropped": 2}
    assert plain["records"] == 1 and plain["skipped"]["no_class_word"]["count"] == 2
    fixed = build_dataset(src, tmp_path / "fixed", pack, caption_rules=DEFAULT_RULES, progress=False)
    assert fixed["captions"] == {"without_class_word": 2, "rewritten": {"prefix": 1, "someone": 1}, "dropped": 0}
    assert fixed["records"] == 3
