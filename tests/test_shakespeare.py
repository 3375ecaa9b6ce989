"""fedlora.shakespeare: the play parser, the role clients and the small pretrained base."""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter

import pytest

from fedlora import shakespeare as S

# ---- the parser on hand-made snippets ------------------------------------------------------------

CAPS_PLAY = """THE ISLAND

by William Shakespeare


DRAMATIS PERSONAE

PROSPERO, the right Duke of Milan
MIRANDA, Daughter to Prospero
FIRST CLOWN, a fisherman

SCENE: An island


ACT 1
SCENE 1
[On the shore; a storm]

[Enter PROSPERO and MIRANDA]

PROSPERO.
Be collected:
No more amazement.

MIRANDA.
O, woe the day!

PROSPERO. [Aside.]
No harm.

[Exit MIRANDA, weeping; thunder heard
far off.]

The hour's now come.

FIRST CLOWN.
Here's neither bush nor shrub. [Lies down] I will here shroud.

MIRANDA. Good sir, your patience.

THE MASQUE OF THE THREE GODDESSES.

1. Iris, descending.

ACT II.

SCENE I. Another part of the island. A cave
at the foot of a hill.

Nobody speaks this line.

PROSPERO.
[Exit Sergeant.
Now it is done.
"""


def test_parse_capital_tags_directions_and_headings_dropped():
    turns = S.parse_play(CAPS_PLAY)
    assert all(isinstance(t, S.Turn) for t in turns)
    assert [(t.speaker, t.text) for t in turns] == [
        ("PROSPERO", "Be collected: No more amazement."),
        ("MIRANDA", "O, woe the day!"),
        # a tag with a direction on its line; the speech goes on after a two-line direction
        ("PROSPERO", "No harm. The hour's now come."),
        ("FIRST CLOWN", "Here's neither bush nor shrub. I will here shroud."),
        ("MIRANDA", "Good sir, your patience."),  # the speech on the tag's line
        ("PROSPERO", "Now it is done."),  # an unclosed "[" ends with its line
    ]
    joined = " ".join(t.text for t in turns)
    for gone in ("DRAMATIS", "ACT", "SCENE", "cave", "storm", "Enter", "Nobody", "Sergeant", "[", "]",
                 "MASQUE", "Iris"):  # a caption ends the speech: the procession after it is nobody's
        assert gone not in joined


ABBREV_PLAY = """THE TRAGEDY OF SOMEONE

by William Shakespeare


PERSONS REPRESENTED.

Lear, King of Britain.
Duke of Cornwall.
Earl of Gloster.
Cordelia, daughter to Lear.
Lady Capulet, Wife to Capulet.
Hamlet, Son to the former King.
Ghost of Hamlet's Father.
Lords, Officers, Messengers, and Attendants.

Scene,--Britain.


ACT I.

Scene I. A Room of State.

[Enter Lear, Cornwall, and Cordelia.]

Lear.
Tell me, my daughters.

Cor.
Nothing, my lord.

Corn.
Dear sister.

Glou.
The king falls from bias.

Ham.
A little more than kin.

Lady Cap.
Marry, that marry is the very theme.

Mess.
News, my lord.

Lear. [Aside.]
Nothing will come of nothing.
"""


def test_parse_abbreviations_mapped_through_the_personae_list():
    turns = S.parse_play(ABBREV_PLAY)
    assert [t.speaker for t in turns] == [
        "LEAR",
        "CORDELIA",  # "Cor." prefixes CORDELIA and CORNWALL; "Corn." took CORNWALL
        "CORNWALL",
        "GLOU",  # the list spells him "Gloster": no name it abbreviates, the tag stays
        "HAMLET",  # "Hamlet's" (the Ghost) is the same name, not an ambiguity
        "LADY CAPULET",
        "MESSENGER",  # a word of the list, not a name: the agent noun made singular
        "LEAR",
    ]
    assert turns[-1].text == "Nothing will come of nothing."


def test_parse_tags_without_period_and_the_prologue_as_a_speaker():
    text = """A DREAM

Persons Represented.

THESEUS, Duke of Athens.
QUINCE, the Carpenter.

ACT I.

SCENE I. Athens.

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace.

QUINCE
Is all our company here?

PROLOGUE

A TITLE IN CAPITALS

This text has no speaker.

PROLOGUE
If we offend, it is with our good will.
"""
    turns = S.parse_play(text)
    assert [(t.speaker, t.text) for t in turns] == [
        ("THESEUS", "Now, fair Hippolyta, our nuptial hour Draws on apace."),
        ("QUINCE", "Is all our company here?"),
        ("PROLOGUE", "If we offend, it is with our good will."),
    ]


def test_group_speakers_keep_their_members_names():
    text = "PERSONS REPRESENTED.\n\nRosencrantz, Courtier.\nGuildenstern, Courtier.\n\nACT I.\n\n" \
           "Ros.\nMy lord!\n\nRos. and Guild.\nWe'll wait upon you.\n"
    assert [t.speaker for t in S.parse_play(text)] == ["ROSENCRANTZ", "ROSENCRANTZ AND GUILDENSTERN"]


# ---- the shipped plays, the split and the rows ---------------------------------------------------

def test_split_covers_every_shipped_work_once():
    S.check_split()
    index = S.play_index()
    assert len(index) == 42 and len(S.PRETRAIN_PLAYS) + len(S.CLIENT_PLAYS) == 37
    assert not set(S.PRETRAIN_PLAYS) & set(S.CLIENT_PLAYS)
    assert (S.ASSETS / "SOURCE.md").is_file()


def test_missing_assets_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "PLAYS_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        S.play_index()


def test_every_client_play_has_several_roles():
    for play in S.CLIENT_PLAYS:
        counts = Counter(t.speaker for t in S.play_turns(play))
        assert sum(n >= 20 for n in counts.values()) >= 5, (play, counts.most_common(8))
    lear = Counter(t.speaker for t in S.play_turns("lear"))  # an abbreviating play, mapped
    assert {"LEAR", "CORDELIA", "EDGAR", "EDMUND", "GONERIL", "REGAN"} <= set(lear)


def test_role_rows_are_each_roles_own_speeches():
    rows = S.role_rows()
    assert rows == S.role_rows()  # deterministic
    assert set(rows[0]) == {"play", "role", "prompt", "completion"}
    roles = Counter(r["role"] for r in rows)
    assert len(roles) > 100
    assert not {r["play"] for r in rows} & set(S.PRETRAIN_PLAYS)
    assert {r["play"] for r in rows} == set(S.CLIENT_PLAYS)
    speeches = {(p, t.speaker, t.text) for p in S.CLIENT_PLAYS for t in S.play_turns(p)}
    line = re.compile(r"[^:\n]+: [^\n]+\n")
    for r in rows:
        play, role = r["role"].split("/")
        assert play == r["play"] and role == role.upper()
        assert r["prompt"].endswith(f"\n{role}:")
        assert r["completion"].startswith(" ") and r["completion"].endswith("\n")
        assert (play, role, r["completion"][1:-1]) in speeches  # the role's own speech
        prev = r["prompt"].split("\n")[0]
        assert len(prev.split(": ", 1)[1]) <= S.PROMPT_CHARS
        # prompt + completion: two lines of the pretraining format
        assert [m.group() for m in line.finditer(r["prompt"] + r["completion"])] == \
            (r["prompt"] + r["completion"]).splitlines(keepends=True)
    per_role = Counter(r["role"] for r in rows)
    assert min(per_role.values()) >= 40 - 1  # the play's opening speech has no prompt


def test_max_roles_keeps_the_largest_roles():
    rows = S.role_rows(min_speeches=40, max_roles=6)
    counts = Counter(r["role"] for r in rows)
    assert len(counts) == 6 and "hamlet/HAMLET" in counts
    everyone = Counter(r["role"] for r in S.role_rows(min_speeches=40))
    assert min(counts.values()) >= sorted(everyone.values())[-6]


def test_write_roles_and_cli(tmp_path, capsys):
    path = S.write_roles(tmp_path / "sub" / "roles.jsonl", min_speeches=100, max_roles=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == S.role_rows(100, 3)
    assert S.main(["roles", str(tmp_path / "cli.jsonl"), "--min-speeches", "100", "--max-roles", "3"]) == 0
    assert f"3 roles, {len(rows)} rows" in capsys.readouterr().out
    assert (tmp_path / "cli.jsonl").read_text() == path.read_text()
    with pytest.raises(SystemExit) as exit_:
        S.main(["roles", str(tmp_path / "bad.jsonl"), "--min-speeches", "0"])
    assert exit_.value.code == 2 and "min_speeches must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()


def test_pretraining_text_format_and_held_out_part():
    text = S.pretraining_text()
    lines = text.splitlines(keepends=True)
    assert all(re.fullmatch(r"[^:\n]+: [^\n]+\n", line) for line in lines)
    train, heldout = S.pretraining_text("train"), S.pretraining_text("heldout")
    assert Counter(train.splitlines() + heldout.splitlines()) == Counter(text.splitlines())
    assert 0.05 < len(heldout) / len(text) < 0.15
    speakers = {line.split(":")[0] for line in lines}
    assert "TIMON" in speakers and "HAMLET" not in speakers and "PROSPERO" not in speakers


# ---- the base model ----------------------------------------------------------------------------------

TINY = dict(vocab_size=300, hidden_size=32, layers=1, heads=2, seq_len=32, steps=30, batch_size=8, lr=1e-2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    t0 = time.monotonic()
    path = S.build_base(out, **TINY, log_every=0)
    return path, time.monotonic() - t0


def _heldout_loss(model, tokenizer, seq_len: int) -> float:
    import torch

    ids = tokenizer(S.pretraining_text("heldout")[:6000], add_special_tokens=False)["input_ids"]
    n = seq_len - 1
    rows = [[tokenizer.bos_token_id] + ids[i:i + n] for i in range(0, len(ids) - n, n)]
    x = torch.tensor(rows)
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def test_build_base_reloads_and_learned(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, seconds = tiny_base
    assert seconds < 60
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert len(tok) == TINY["vocab_size"] == model.config.vocab_size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert not getattr(tok, "chat_template", None)
    sample = "HAMLET: To be, or not to be,--that is the question:\nOPHELIA: Café, naïve?\n"
    ids = tok(sample)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == sample
    row = S.role_rows(max_roles=1)[0]  # prompt and completion tokenise apart as together
    assert tok(row["prompt"])["input_ids"] + tok(row["completion"], add_special_tokens=False)["input_ids"] \
        == tok(row["prompt"] + row["completion"])["input_ids"]

    meta = S.base_metadata(path)
    assert meta["params"]["plays"] == list(S.PRETRAIN_PLAYS)
    assert meta["heldout_loss"] < meta["initial_heldout_loss"] and math.isfinite(meta["final_train_loss"])
    trained = _heldout_loss(model.eval(), tok, TINY["seq_len"])
    torch.manual_seed(1)
    untrained = _heldout_loss(AutoModelForCausalLM.from_config(model.config).eval(), tok, TINY["seq_len"])
    assert trained < untrained - 0.3, (trained, untrained)


def test_build_base_reuses_a_finished_build(tiny_base):
    path, _ = tiny_base
    stamps = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    t0 = time.monotonic()
    assert S.build_base(path, **TINY, log_every=0) == path
    assert time.monotonic() - t0 < 5
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == stamps
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp folder left


def test_build_base_same_seed_same_weights(tiny_base, tmp_path):
    from safetensors.torch import load_file

    path, _ = tiny_base
    again = S.build_base(tmp_path / "again", **TINY, log_every=0)
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (path / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = S.build_base(tmp_path / "other", **{**TINY, "seed": 1}, log_every=0)
    c = load_file(other / "model.safetensors")
    assert any(not (a[k] == c[k]).all() for k in a)


def _fake_pretrain(built: list):
    def pretrain(out, params, log_every):  # writes the files a finished build has, instantly
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text(str(len(built)))
        built.append(params)
        return {}
    return pretrain


def test_build_base_default_folder_is_keyed_by_the_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    built: list = []
    monkeypatch.setattr(S, "_pretrain", _fake_pretrain(built))
    path = S.build_base(**TINY, log_every=0)
    assert path.parent == tmp_path and re.fullmatch(r"shakespeare-llama-[0-9a-f]{10}", path.name)
    assert S.build_base(**TINY, log_every=0) == path and len(built) == 1  # reused
    other = S.build_base(**{**TINY, "steps": 31}, log_every=0)
    assert other != path and len(built) == 2
    assert S.build_base(**TINY, force=True, log_every=0) == path and len(built) == 3
    assert (path / "config.json").read_text() == "2"  # replaced by the forced build
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])


def test_stale_temp_folders_of_killed_builds_are_removed(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "_pretrain", _fake_pretrain([]))
    dead = tmp_path / ".base.building-999999999-0123abcd"  # no such process
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    S.build_base(tmp_path / "base", **TINY, log_every=0)
    assert [p.name for p in tmp_path.iterdir()] == ["base"]


def test_a_failed_build_leaves_nothing_that_looks_finished(monkeypatch, tmp_path):
    def crash(out, params, log_every):
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_pretrain", crash)
    with pytest.raises(KeyboardInterrupt):
        S.build_base(tmp_path / "base", **TINY, log_every=0)
    assert list(tmp_path.iterdir()) == []


def test_build_base_refuses_a_folder_that_is_not_a_base(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a fedlora Shakespeare base"):
        S.build_base(tmp_path / "mine", **TINY, log_every=0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_base_prints_the_model_name(monkeypatch, tiny_base, capsys):
    path, _ = tiny_base
    calls = []
    monkeypatch.setattr(S, "build_base", lambda out, force, **kw: calls.append((out, force, kw)) or path)
    assert S.main(["base", "--out", str(path), "--steps", "7", "--force"]) == 0
    assert calls == [(path, True, {"steps": 7})]
    out = capsys.readouterr().out
    assert f'model.name = "hf:{path}"' in out and "held-out loss" in out
