"""Shakespeare for the causal-LM path: the plays as speaker turns, per-role clients, a small base model.

The recipe, top to bottom:

1. **Texts.** ``fedlora/assets/shakespeare/plays/*.txt`` (package data; the Project Gutenberg texts
   described in ``assets/shakespeare/SOURCE.md``, public domain): 37 plays, the sonnets and four
   poems. The sonnets and poems (``NON_DRAMATIC``) have no speakers and are never used.
2. **Parsing** (``parse_play``). A play is front matter (title, the dramatis personae), then the
   text. The text is cut into paragraphs at blank lines. A paragraph opening with a speaker tag
   ("MIRANDA.", "Ber.", "First Clown.", "FIRST LORD. [Aside.]"; a few plays, e.g. A Midsummer
   Night's Dream, write the tag in capitals without the period) starts a new turn; every other
   paragraph continues the current speaker's turn (a speech goes on after a stage direction).
   A tag this play uses may also carry the speech's first words on its line ("ALL. Amen.").
   ACT / SCENE / PROLOGUE / EPILOGUE / INDUCTION headings (and captions: a capitals line standing
   alone that is no tag) end the turn and clear the speaker, so text nobody is tagged for (an
   untagged prologue, a procession's list) is dropped. Stage directions — ``[...]``,
   also ``{...]`` and ``[...}`` as the texts' typos have them, possibly spanning lines — are
   removed. A turn's lines are joined into one line.
3. **Speaker names.** Tags are upper-cased. Plays that abbreviate ("Ham.", "Glou.", "Lady Cap.")
   are mapped through their personae list: a tag that is not itself a name (or words of one)
   in the list becomes the name words it abbreviates when that is unambiguous ("Ham." →
   HAMLET, "Alb." → ALBANY, "Lady Cap." → LADY CAPULET); a tag that prefixes several names is
   resolved only if the other names are taken by other tags of the play ("Cor." → CORDELIA
   because "Corn." is CORNWALL); a tag that abbreviates no name may abbreviate another capitalised
   word of the list ("WOR." → WORCESTER from "Thomas Percy, Earl of Worcester"); anything else
   keeps its tag ("Glou." → GLOU: the list spells him "Gloster"). So a role has one name
   throughout a play.
4. **Split** (fixed, documented): ``PRETRAIN_PLAYS`` (12 plays) only pretrain the base model and
   no client ever holds them; ``CLIENT_PLAYS`` (the other 25) give the federated clients.
5. **Text format**, one turn a line, everywhere: ``"SPEAKER: speech\\n"``.
   ``pretraining_text()`` is the pretraining plays in that format. ``role_rows()`` makes one
   client per speaking role (play, character) of the client plays with ``min_speeches``
   speeches or more, LEAF-style (Caldas et al., 2018), and one prompt/completion pair per speech:
   ``prompt = "PREV: <previous speech, its last ~200 characters>\\nROLE:"``,
   ``completion = " <the role's speech>\\n"`` — so ``prompt + completion`` is exactly two lines of
   the pretraining format, and fine-tuning is domain adaptation (a character's voice), not a
   change of format.
6. **Base model** (``build_base``): a byte-level BPE tokenizer (``tokenizers``; ``<s>``, ``</s>``,
   ``<pad>``; it prepends ``<s>`` like Llama's, adds no ``</s>``, has no chat template) trained on
   the pretraining plays' training part, a small ``LlamaForCausalLM`` (tied embeddings) pretrained
   nanoGPT-style on CPU (AdamW, warm-up + cosine schedule, random windows of ``seq_len`` tokens
   that start at a turn, each led by ``<s>`` as a fine-tuning row is), its loss measured on
   held-out text (the last 10% of the turns of every pretraining play, never trained on), then
   saved with ``save_pretrained``. Cached by a hash of its parameters and of the text; written
   atomically.

CLI: ``python -m fedlora.shakespeare base [--out DIR] [--steps N] [--force]`` and
``python -m fedlora.shakespeare roles OUT.jsonl [--min-speeches N] [--max-roles K]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

ASSETS = Path(__file__).parent / "assets" / "shakespeare"
PLAYS_DIR = ASSETS / "plays"

#: the sonnets and poems: no speakers, never used
NON_DRAMATIC = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
                "sonnets")
#: pretraining only (no client holds them): early comedies, the first tetralogy and King John,
#: the late collaborations — a mix of comedy, history and tragedy, of verse and prose.
PRETRAIN_PLAYS = ("comedy_of_errors", "two_gentlemen_of_verona", "loves_labours_lost",
                  "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_ii", "john",
                  "henry_viii", "tragedy_of_titus_andronicus", "timon_of_athens", "pericles")
#: the plays whose roles become the federated clients (the best known plays are all here)
CLIENT_PLAYS = ("alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "coriolanus",
                "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "julius_caesar",
                "lear", "macbeth", "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
                "midsummer_nights_dream", "much_ado_about_nothing", "othello", "richard_iii",
                "romeo_and_juliet", "taming_of_the_shrew", "tempest", "troilus_and_cressida",
                "twelfth_night", "winters_tale")
HELDOUT_FRACTION = 0.1  # the last 10% of each pretraining play's turns: the base's held-out text
PROMPT_CHARS = 200  # the previous speech in a prompt: at most its last ~200 characters
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
#: bump when the recipe changes in a way the parameters do not show: cached bases are rebuilt
RECIPE = "fedlora-shakespeare-base/1"
BASE_META = "fedlora_base.json"


@dataclass(frozen=True)
class Turn:
    """One speech: the speaker's name (upper case, abbreviations mapped) and the speech as one line."""

    speaker: str
    text: str


# ---- 1. texts ----------------------------------------------------------------------------------

def _plays_dir() -> Path:
    if not (PLAYS_DIR / "INDEX.tsv").is_file():
        raise FileNotFoundError(
            f"the Shakespeare texts are missing: expected {PLAYS_DIR}/INDEX.tsv and the plays next to "
            "it (package data of fedlora; reinstall fedlora, or copy shared/data/shakespeare/plays "
            "there)")
    return PLAYS_DIR


def play_index() -> dict[str, str]:
    """``{play: title}`` for every shipped work, in ``INDEX.tsv``'s order (play = file stem)."""
    rows = (_plays_dir() / "INDEX.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return {r.split("\t")[0].removesuffix(".txt"): r.split("\t")[1] for r in rows if r.strip()}


def read_play(play: str) -> str:
    path = _plays_dir() / f"{play}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no such play: {path} (known: {', '.join(play_index())})")
    return path.read_text(encoding="utf-8")


# ---- 2. parsing --------------------------------------------------------------------------------

# "ACT I.", "ACT 1", "ACT FIRST.", "Act I.", "SCENE 2", "Scene III. A room." — the numeral in capitals,
# so that a speech line starting "Act like..." is never a heading.
_ACT_SCENE = re.compile(r"(?:ACT|Act|SCENE|Scene)\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_SECTION = re.compile(r"(?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION)\.?", re.I)
_PERSONAE_HEAD = re.compile(r"(DRAMATIS\s+PERSONAE|PERSONS\s+REPRESENTED)", re.I)
_TRAILING_DIRECTION = re.compile(r"\s*\[[^\]]*\]?\s*$")
_TAG_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*\.?|&")
_CONNECTORS = {"of", "and", "the", "&", "de", "la", "le", "du"}
_ROMAN = re.compile(r"[IVXLC]+")
_GROUP_SPLIT = re.compile(r"\s+(?:AND|&)\s+")
_MAX_TAG_WORDS, _MAX_TAG_CHARS = 4, 40
_PLURAL_AGENT = ("ERS", "ORS", "ANTS", "ENTS")  # "Messengers", "Servants" in a personae list


def _is_heading(paragraph: list[str], i: int) -> bool:
    """Line ``i`` of a paragraph is an ACT/SCENE heading, or a PROLOGUE/EPILOGUE/INDUCTION line
    standing alone (followed by a blank line: otherwise it is the Prologue speaking)."""
    s = paragraph[i].strip()
    if _ACT_SCENE.match(s):
        return True
    return bool(_SECTION.fullmatch(s)) and i == len(paragraph) - 1


def _tag(line: str, *, alone: bool) -> str | None:
    """The speaker tag on ``line``, normalised ("Lady  Cap." → "LADY CAP"), or None.

    A tag is a short line of capitalised words (connectors such as "of"/"and" aside) ending in a
    period, optionally followed by a stage direction ("FIRST LORD. [Aside.]"). A line in capitals
    without the period is a tag too, but only when the speech follows on the next line
    (``alone=False``): a lone capitals line is a title ("TROILUS AND CRESSIDA").
    """
    s = _bare(line)
    if not s or len(s) > _MAX_TAG_CHARS:
        return None
    words = s.split()
    if len(words) > _MAX_TAG_WORDS or not all(_TAG_WORD.fullmatch(w) for w in words):
        return None
    if not words[0][0].isupper() or any(not w[0].isupper() and w.lower() not in _CONNECTORS
                                        for w in words):
        return None
    core = s.rstrip(".-").strip()
    if not core or _ROMAN.fullmatch(core.replace(".", "")) or _ACT_SCENE.match(s):
        return None  # "XIII." (a poem's number), headings
    if alone and not s.isupper():
        return None  # "Westminster Abbey." under a scene heading: a place, not a speaker
    if not s.rstrip("-").endswith(".") and not (s.isupper() and not alone):
        return None
    return _normalise_tag(core)


def _bare(line: str) -> str:
    """A line without a trailing stage direction ("FIRST LORD. [Aside.]" → "FIRST LORD.")."""
    line = line.strip().replace("{", "[").replace("}", "]")  # "FIRST LORD. {Aside.]": a typo
    return _TRAILING_DIRECTION.sub("", line).rstrip("]").strip()


def _speech_after(line: str, spelling: str) -> bool:
    """``line`` is the tag ``spelling`` ("ALL.") followed by speech ("ALL. Amen."), not by more of a
    group's tag ("Ros. and Guild.")."""
    rest = line[len(spelling):].split()
    return spelling.endswith(".") and line.startswith(spelling + " ") and bool(rest) \
        and rest[0].lower() not in _CONNECTORS


def _is_caption(line: str) -> bool:
    """A line in capitals standing alone that is no tag (too long for one) is a caption or a
    title: like a heading, it ends the current speech."""
    return line.isupper() and sum(c.isalpha() for c in line) >= 6


def _normalise_tag(core: str) -> str:
    """Upper case, single spaces, no period before a group's AND ("PEMBROKE. AND BIGOT")."""
    return re.sub(r"\.(?=\s+(?:AND|&)\s)", "", " ".join(core.upper().split()))


def _paragraphs(lines: Sequence[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _strip_directions(lines: Sequence[str]) -> str:
    """The speech in ``lines`` (one paragraph) without its stage directions, as one line.

    ``[`` ... ``]`` is removed, nested or spanning lines. The texts have typos, so: an ``[`` with no
    ``]`` later in the paragraph ends at its line's end ("[Exit Sergeant." then speech), and a
    ``]`` with no ``[`` before it closes a direction that lost its bracket ("Enter Mayor.]"):
    the paragraph's text up to it is dropped.
    """
    text = "\n".join(lines).replace("{", "[").replace("}", "]")
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == "[":
            if depth == 0 and "]" not in text[i:]:
                nl = text.find("\n", i)
                i = len(text) if nl < 0 else nl  # unclosed: the direction ends with its line
                continue
            depth += 1
        elif c == "]":
            if depth:
                depth -= 1
            else:
                out.clear()  # a stray "]": everything before it was an unbracketed direction
        elif depth == 0:
            out.append(c)
        i += 1
    return " ".join("".join(out).split())


def _personae(front: Sequence[str]) -> tuple[list[list[str]], set[str]]:
    """The personae list of the front matter: (names, other capitalised words), upper case.

    An entry's name is the text before its first comma/semicolon/brace/wide gap ("Claudius, King of
    Denmark." → CLAUDIUS); further comma-separated parts count as names only in capitals ("CICERO,
    PUBLIUS, POPILIUS LENA, Senators." → three names). Possessives and leading articles are dropped.
    The other words are every capitalised word of the list ("Lady Percy, Wife to Hotspur" →
    HOTSPUR; "Lords, Officers, Sheriff, Vintner" → SHERIFF, VINTNER), for tags no name explains.
    """
    start = next((i + 1 for i, line in enumerate(front) if _PERSONAE_HEAD.search(line)), 0)
    names: list[list[str]] = []
    words: set[str] = set()
    for line in front[start:]:
        s = line.strip().replace("--", " ")
        if not s or s.upper().startswith("SCENE"):
            continue
        words |= {re.sub(r"'S$", "", w.upper()) for w in re.findall(r"[A-Z][A-Za-z'\-]+", s)}
        parts = [p.strip() for p in re.split(r"[,;{}\"]|\s{2,}", s)]
        for k, part in enumerate(parts):
            if not part or (k and not part.isupper()):
                continue
            name = [re.sub(r"'S$", "", w) for w in re.split(r"[\s.]+", part.upper()) if w]
            while name and name[0] in ("A", "AN", "THE"):
                name = name[1:]
            name = [w for w in name if w.isalpha() or "-" in w or "'" in w]
            if name:
                names.append(name)
    return names, words - {w.upper() for w in _CONNECTORS}


def _expansions(tag_words: list[str], names: list[list[str]]) -> set[str] | None:
    """None when the tag is a name (or consecutive words of one) as it stands; else the names it
    abbreviates: consecutive name words each starting with the tag's word ("LADY CAP" → LADY
    CAPULET), a bare plural ("CLOWN" / CLOWNS) excluded."""
    n = len(tag_words)
    found: set[str] = set()
    for name in names:
        for j in range(len(name) - n + 1):
            run = name[j:j + n]
            if run == tag_words:
                return None
            if all(r.startswith(t) for r, t in zip(run, tag_words)) and \
                    not (n == 1 and run[0] in (tag_words[0] + "S", tag_words[0] + "ES")):
                found.add(" ".join(run))
    return found


def _speaker_map(tags: set[str], names: list[list[str]], words: set[str]) -> dict[str, str]:
    """Tag → role name for one play (see the module docstring, step 3).

    A tag part that is a name (or words of one) stays; one that abbreviates exactly one name
    becomes it; one that abbreviates no name but exactly one other word of the personae list
    becomes that word ("WOR" → WORCESTER; "MESS" → MESSENGER, an agent noun made singular); one
    that abbreviates several names becomes the one no other tag of the play took, if exactly one;
    the rest stay.
    """
    parts = {p for t in tags for p in _GROUP_SPLIT.split(t)}
    mapped: dict[str, str] = {}
    ambiguous: dict[str, set[str]] = {}
    for p in sorted(parts):
        tag_words = [w for w in re.split(r"[\s.]+", p) if w]
        cands = _expansions(tag_words, names)
        if cands is not None and not cands and len(tag_words) == 1 and p not in words:
            t = tag_words[0]
            cands = {w[:-1] if w.endswith(_PLURAL_AGENT) else w
                     for w in words if w.startswith(t) and w not in (t, t + "S", t + "ES")}
        if cands is None or not cands:
            mapped[p] = p
        elif len(cands) == 1:
            mapped[p] = next(iter(cands))
        else:
            ambiguous[p] = cands
    taken = set(mapped.values())
    for p, cands in sorted(ambiguous.items()):
        rest = cands - taken
        mapped[p] = next(iter(rest)) if len(rest) == 1 else p
    return {t: " AND ".join(mapped[p] for p in _GROUP_SPLIT.split(t)) for t in tags}


def parse_play(text: str) -> list[Turn]:
    """The speeches of one play, in order (see the module docstring, steps 2-3).

    The front matter (everything before the first ACT/SCENE/PROLOGUE/INDUCTION heading) is skipped
    but read for the personae list; a text without such a heading is parsed from its first line.
    """
    lines = text.splitlines()
    body_start = 0
    for k, par in _indexed_paragraphs(lines):
        if _is_heading(par, 0):
            body_start = k
            break
    front, body = lines[:body_start], lines[body_start:]
    paragraphs = list(_paragraphs(body))

    # pass 1: how this play spells its tags ("CYMBELINE.", "Ham."), also to find the tags that open a
    # paragraph with the speech on the same line ("CYMBELINE. Thou foolish thing!", "ALL. Amen.")
    found = {_bare(par[0]) for par in paragraphs
             if not _is_heading(par, 0) and _tag(par[0], alone=len(par) == 1) is not None}
    spellings = {sp for sp in found if not any(_speech_after(sp, o) for o in found)}
    inline = sorted((sp for sp in spellings if sp.endswith(".")), key=len, reverse=True)

    raw: list[tuple[str, list[str]]] = []  # (tag, its paragraphs' speech) in order
    speaker: str | None = None
    for par in paragraphs:
        if _is_heading(par, 0):
            speaker = None  # a new act/scene (the rest of the paragraph: its place, a direction)
            continue
        first, rest = _bare(par[0]), par
        tag = _tag(par[0], alone=len(par) == 1) if first in spellings else None
        if tag is not None:
            rest = par[1:]
        else:
            sp = next((sp for sp in inline if _speech_after(first, sp)), None)
            if sp is not None:
                tag, rest = _tag(sp, alone=False), [par[0].strip()[len(sp):]] + par[1:]
        if tag is None and len(par) == 1 and _is_caption(first):
            speaker = None  # "THE ORDER OF THE CORONATION." (a list of a procession follows)
            continue
        if tag is not None:
            speaker = tag
            raw.append((tag, []))
        speech = _strip_directions(rest)
        if speech and speaker is not None:
            raw[-1][1].append(speech)

    mapping = _speaker_map({t for t, _ in raw}, *_personae(front))
    return [Turn(mapping[t], " ".join(parts)) for t, parts in raw if parts]


def _indexed_paragraphs(lines: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(index of its first line, paragraph) for each paragraph."""
    k = 0
    for par in _paragraphs(lines):
        while not lines[k].strip():
            k += 1
        yield k, par
        k += len(par)


@cache
def play_turns(play: str) -> tuple[Turn, ...]:
    """``parse_play`` of a shipped play (memoised)."""
    if play in NON_DRAMATIC:
        raise ValueError(f"{play} is not a play (no speakers)")
    return tuple(parse_play(read_play(play)))


# ---- 4./5. split and text format ------------------------------------------------------------------

def check_split() -> None:
    """The split covers every shipped work exactly once (raises otherwise)."""
    groups = {"PRETRAIN_PLAYS": PRETRAIN_PLAYS, "CLIENT_PLAYS": CLIENT_PLAYS, "NON_DRAMATIC": NON_DRAMATIC}
    seen = Counter(p for g in groups.values() for p in g)
    index = set(play_index())
    twice = sorted(p for p, n in seen.items() if n > 1)
    if twice or set(seen) != index:
        raise RuntimeError(f"bad Shakespeare split: in two groups {twice}, unknown "
                           f"{sorted(set(seen) - index)}, unassigned {sorted(index - set(seen))}")


def format_turn(turn: Turn) -> str:
    """The one text format: ``"SPEAKER: speech\\n"``."""
    return f"{turn.speaker}: {turn.text}\n"


def _pretraining_parts() -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): per pretraining play, its last 10% of turns held out."""
    train: list[str] = []
    heldout: list[str] = []
    for play in PRETRAIN_PLAYS:
        turns = play_turns(play)
        cut = len(turns) - max(1, round(len(turns) * HELDOUT_FRACTION))
        train += [format_turn(t) for t in turns[:cut]]
        heldout += [format_turn(t) for t in turns[cut:]]
    return train, heldout


def pretraining_text(part: Literal["all", "train", "heldout"] = "all") -> str:
    """The pretraining plays as ``"SPEAKER: speech\\n"`` lines, play after play.

    ``part="train"`` / ``"heldout"``: without / only the last 10% of each play's turns (the base is
    trained on the first and evaluated on the second).
    """
    if part == "all":
        return "".join(format_turn(t) for play in PRETRAIN_PLAYS for t in play_turns(play))
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be all, train or heldout, got {part!r}")
    train, heldout = _pretraining_parts()
    return "".join(train if part == "train" else heldout)


def _is_group(speaker: str) -> bool:
    """"ALL", "BOTH", "ROSENCRANTZ AND GUILDENSTERN": several characters, never a client."""
    return speaker in ("ALL", "BOTH") or bool(_GROUP_SPLIT.search(speaker))


def _tail(text: str, limit: int = PROMPT_CHARS) -> str:
    """The last ``limit`` characters of ``text``, cut at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = cut.find(" ")
    return cut[space + 1:] if 0 <= space < len(cut) - 1 else cut


def role_rows(min_speeches: int = 40, max_roles: int | None = None) -> list[dict]:
    """One client per speaking role of the client plays, one prompt/completion row per speech.

    A role is (play, character) with at least ``min_speeches`` speeches (group speakers such as
    ALL excluded); ``max_roles`` keeps the roles with the most speeches (ties by name). Rows:
    ``{"play", "role": "<play>/<ROLE>", "prompt": "<PREV>: <previous speech>\\n<ROLE>:",
    "completion": " <speech>\\n"}``; a play's opening speech has no previous one and gives no row.
    Order: roles in ``CLIENT_PLAYS`` order, within a play by first speech; each role's rows in the
    order spoken.
    """
    if min_speeches < 1:
        raise ValueError(f"min_speeches must be >= 1, got {min_speeches}")
    if max_roles is not None and max_roles < 1:
        raise ValueError(f"max_roles must be >= 1 or None, got {max_roles}")
    roles: list[tuple[str, str, int]] = []  # (play, speaker, speeches) in play order, first speech
    for play in CLIENT_PLAYS:
        counts = Counter(t.speaker for t in play_turns(play))
        roles += [(play, s, n) for s, n in counts.items() if n >= min_speeches and not _is_group(s)]
    if max_roles is not None:
        keep = set(sorted(roles, key=lambda r: (-r[2], f"{r[0]}/{r[1]}"))[:max_roles])
        roles = [r for r in roles if r in keep]
    rows: list[dict] = []
    for play, speaker, _ in roles:
        turns = play_turns(play)
        for prev, turn in zip(turns, turns[1:]):
            if turn.speaker == speaker:
                rows.append({"play": play, "role": f"{play}/{speaker}",
                             "prompt": f"{prev.speaker}: {_tail(prev.text)}\n{speaker}:",
                             "completion": f" {turn.text}\n"})
    return rows


def write_roles(path: str | Path, min_speeches: int = 40, max_roles: int | None = None) -> Path:
    """``role_rows(...)`` as JSONL (one object a line), written atomically; returns the path."""
    return _write_jsonl(Path(path), role_rows(min_speeches, max_roles))


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- 6. the base model -----------------------------------------------------------------------------

def base_params(*, vocab_size: int, hidden_size: int, layers: int, heads: int, seq_len: int, steps: int,
                batch_size: int, lr: float, seed: int) -> dict:
    """Everything a base build depends on (its cache key): the arguments, the recipe version, the
    pretraining plays and a hash of their text (a parser change rebuilds)."""
    text = pretraining_text("all")
    return {"recipe": RECIPE, "vocab_size": vocab_size, "hidden_size": hidden_size, "layers": layers,
            "heads": heads, "seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "plays": list(PRETRAIN_PLAYS),
            "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _params_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def _finished(out_dir: Path, params: dict) -> bool:
    """``out_dir`` holds a complete build of ``params``."""
    try:
        meta = json.loads((out_dir / BASE_META).read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return meta.get("params") == params and all((out_dir / f).is_file() for f in files)


def train_tokenizer(lines: Sequence[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE (GPT-2 style: any text encodes, nothing is unknown) trained on ``lines``,
    wrapped as a ``PreTrainedTokenizerFast`` that prepends ``<s>`` (Llama's convention), adds no
    ``</s>`` and has no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the {len(alphabet)} bytes and "
                         f"{len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet)
    tok.train_from_iterator(lines, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=model_max_length)


def _encode_lines(tokenizer, lines: Sequence[str]):
    """All lines as one token stream (no specials) and the position where each line starts.

    The byte-level pre-tokenizer splits at the newline, so encoding line by line gives the same
    ids as encoding the whole text. (Through the ``tokenizers`` backend: no warning about lines
    longer than ``model_max_length``.)"""
    import torch

    ids: list[int] = []
    starts: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(lines), add_special_tokens=False):
        starts.append(len(ids))
        ids += enc.ids
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Deterministic CPU training on ``threads`` threads; the caller's settings restored after."""
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


_EVAL_BATCH = 64  # windows per forward pass when measuring the held-out loss (no gradients: cheap)


def _windows(stream, seq_len: int) -> list:
    """``stream`` cut into consecutive windows of ``seq_len - 1`` tokens (the last one shorter)."""
    return [stream[i:i + seq_len - 1] for i in range(0, len(stream) - 1, seq_len - 1)]


def _windows_loss(model, windows: Sequence, bos: int, batch_size: int) -> float:
    """Mean next-token loss over ``windows``, each led by ``<s>``: every token predicted once, from
    the window's tokens before it (the held-out measure)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            x = torch.full((len(batch), max(len(c) for c in batch) + 1), bos, dtype=torch.long)
            labels = torch.full_like(x, -100)  # -100: not predicted (the <s>, the padding)
            for r, c in enumerate(batch):
                x[r, 1:len(c) + 1] = c
                labels[r, 1:len(c) + 1] = c
            logits = model(input_ids=x).logits[:, :-1]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 10% of ``lr``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _train_threads() -> int:
    """Half the CPUs this process may use, 1 to 4: a model this small gains little from more
    threads, and on a shared machine (2 cores here) oversubscribed threads wait on each other."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(4, available // 2))


def _pretrain(out: Path, params: dict, log_every: int) -> dict:
    """Tokenizer + model + pretraining loop; saves both into ``out``; returns the metrics."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    p = params
    train_lines, heldout_lines = _pretraining_parts()
    tokenizer = train_tokenizer(train_lines, p["vocab_size"], p["seq_len"])
    train_ids, starts = _encode_lines(tokenizer, train_lines)
    heldout_ids, _ = _encode_lines(tokenizer, heldout_lines)
    bos = tokenizer.bos_token_id
    seq_len, batch_size = p["seq_len"], p["batch_size"]
    # windows start at a turn, so the model sees "<s>SPEAKER: ..." exactly as a fine-tuning row starts
    starts = starts[starts + seq_len - 1 <= len(train_ids)]
    if len(starts) == 0:
        raise ValueError(f"the pretraining text ({len(train_ids)} tokens) is shorter than seq_len={seq_len}")

    torch.manual_seed(p["seed"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p["hidden_size"], intermediate_size=4 * p["hidden_size"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
        max_position_embeddings=seq_len, tie_word_embeddings=True, bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    n_params = sum(t.numel() for t in model.parameters())
    heldout_windows = _windows(heldout_ids, seq_len)
    probe_windows = heldout_windows[::max(1, len(heldout_windows) // 16)]  # for the progress lines
    initial_heldout = _windows_loss(model, heldout_windows, bos, _EVAL_BATCH)

    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p["lr"], betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(p["seed"])
    offsets = torch.arange(seq_len - 1)
    losses: list[float] = []
    model.train()
    for step in range(p["steps"]):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, p["steps"], p["lr"])
        pick = starts[torch.randint(len(starts), (batch_size,), generator=gen)]
        x = torch.cat([torch.full((batch_size, 1), bos), train_ids[pick[:, None] + offsets]], dim=1)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == p["steps"]):
            # nanoGPT-style progress: the mean train loss since the last line, held-out loss on a sample
            recent = losses[-log_every:]
            probe = _windows_loss(model, probe_windows, bos, _EVAL_BATCH)
            model.train()
            print(f"[shakespeare base] step {step + 1}/{p['steps']} "
                  f"train loss {sum(recent) / len(recent):.3f} held-out (sample) {probe:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.1e} {time.monotonic() - t0:.0f}s",
                  file=sys.stderr, flush=True)

    heldout = _windows_loss(model, heldout_windows, bos, _EVAL_BATCH)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = losses[-max(1, len(losses) // 10):]
    return {"n_parameters": n_params, "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
            "initial_heldout_loss": round(initial_heldout, 4),
            "final_train_loss": round(sum(tail) / len(tail), 4), "heldout_loss": round(heldout, 4),
            "ln_vocab": round(math.log(len(tokenizer)), 4), "seconds": round(time.monotonic() - t0, 1)}


def _remove_stale_builds(out_dir: Path) -> None:
    """Temp folders (``.<name>.building-<pid>-<hex>``, ``.<name>.old-<pid>-<hex>``) of builds whose
    process is gone (killed) are removed."""
    for stale in [*out_dir.parent.glob(f".{out_dir.name}.building-*"),
                  *out_dir.parent.glob(f".{out_dir.name}.old-*")]:
        try:
            os.kill(int(stale.name.rsplit("-", 2)[-2]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive: another user's process


def build_base(out_dir: Path | None = None, *, vocab_size: int = 2048, hidden_size: int = 128,
               layers: int = 4, heads: int = 4, seq_len: int = 128, steps: int = 600,
               batch_size: int = 16, lr: float = 3e-3, seed: int = 0, force: bool = False,
               log_every: int = 50) -> Path:
    """The small pretrained Llama base on the pretraining plays (see the module docstring, step 6).

    ``out_dir`` defaults to ``$FEDLORA_CACHE/shakespeare-llama-<hash of the parameters>``. If it
    already holds a finished build of the same parameters it is returned as is (``force``
    rebuilds). The build happens in a temp folder next to ``out_dir`` and is renamed into place
    when complete, with ``fedlora_base.json`` (parameters, plays, losses); a killed build leaves
    no folder that looks finished. An existing ``out_dir`` that is not a fedlora base is refused.
    Same parameters on the same machine → the same weights. ``log_every``: a progress line on
    stderr every that many steps (0: quiet).

    The defaults (1.31M parameters, 600 steps of 16 × 128 tokens ≈ 3 passes over the 400k training
    tokens) take ~3 minutes of one CPU thread; measured on a shared 2-core machine: held-out loss
    4.44-4.47 over two seeds (untrained 7.67, ln 2048 = 7.62). ``lr=5e-3`` varied more (4.49-4.66).
    """
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("layers", layers),
                        ("heads", heads), ("seq_len", seq_len), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    params = base_params(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
                         seq_len=seq_len, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    if out_dir is None:
        from fedlora.data import cache_root

        out_dir = cache_root() / f"shakespeare-llama-{_params_key(params)}"
    out_dir = Path(out_dir).expanduser().resolve()
    if not force and _finished(out_dir, params):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / BASE_META).is_file())):
        raise FileExistsError(f"{out_dir} exists and is not a fedlora Shakespeare base (no {BASE_META}); "
                              "refusing to overwrite it: choose another folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out_dir)

    import tokenizers
    import torch
    import transformers

    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        threads = _train_threads()
        with _torch_settings(threads):
            metrics = _pretrain(tmp, params, log_every)
        meta = {"params": params, "key": _params_key(params), **metrics, "threads": threads,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "tokenizers": tokenizers.__version__}}
        (tmp / BASE_META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks it finished
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if out_dir.exists():
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _finished(out_dir, params):  # not a concurrent identical build winning the race
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def base_metadata(path: str | Path) -> dict:
    """The ``fedlora_base.json`` of a built base."""
    return json.loads((Path(path) / BASE_META).read_text())


# ---- CLI ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.shakespeare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="build (or reuse) the pretrained base model; print its folder")
    base.add_argument("--out", type=Path, default=None, help="folder (default: under $FEDLORA_CACHE)")
    base.add_argument("--steps", type=int, default=None, help="pretraining steps (default: build_base's)")
    base.add_argument("--force", action="store_true", help="rebuild even if a finished build is there")
    roles = sub.add_parser("roles", help="write the per-role client rows as JSONL")
    roles.add_argument("out", type=Path)
    roles.add_argument("--min-speeches", type=int, default=40)
    roles.add_argument("--max-roles", type=int, default=None)
    args = parser.parse_args(argv)

    try:
        if args.command == "base":
            kwargs = {} if args.steps is None else {"steps": args.steps}
            path = build_base(args.out, force=args.force, **kwargs)
            meta = base_metadata(path)
            print(f"base: {path}\n  {meta['n_parameters']:,} parameters, "
                  f"train loss {meta['final_train_loss']}, held-out loss {meta['heldout_loss']} "
                  f"(untrained {meta['initial_heldout_loss']}, ln(vocab) {meta['ln_vocab']})")
            print(f'model.name = "hf:{path}"')
        else:
            rows = role_rows(args.min_speeches, args.max_roles)
            path = _write_jsonl(args.out, rows)
            print(f"{len({r['role'] for r in rows})} roles, {len(rows)} rows -> {path}")
    except (ValueError, OSError) as e:  # bad arguments, a missing asset, a folder we won't overwrite
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
