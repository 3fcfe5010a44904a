"""A1111's (v1.10) prompt language, read as A1111 reads it. Text only: no model, no torch.

A positive prompt is read in this order:
1. `<kind:args>` tags (`<lora:fox:0.8>`, `<hypernet:x:1>`) are taken out (`extra_networks`);
   A1111 reads them from the positive prompt only.
2. `AND` splits it into parts, each with an optional trailing `:weight` (`and_parts`):
   composable diffusion, which guides towards each part by its weight.
3. Each part (and the negative prompt) becomes a schedule of plain prompts over the sampling
   steps (`schedule`): `[a:b:N]` is a before and b after step N, `[a:N]` adds a after N,
   `[a::N]` removes a after N, `[a|b]` alternates every step. N with a decimal point is a
   fraction of the steps, else a step number (A1111's default, "new" timelines). A prompt the
   schedule grammar does not accept is kept whole, as A1111 keeps it.
4. Each of those prompts is split into weighted fragments (`emphasis`): `(x)` x1.1, `[x]` /1.1,
   `(x:w)` xw, nested ones multiplying, `\\(` and friends literal, unclosed brackets closed at the
   end; `BREAK` starts a new 75-token chunk. This never fails.
5. `weight_problem` says what weighs or nests beyond limits.py's bounds (A1111 has none), so
   Settings.validate can refuse it before a model loads.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ldm_cli.limits import MAX_PROMPT_NESTING, MAX_PROMPT_WEIGHT

# -- 1. extra networks ------------------------------------------------------------------------
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:args>` tag: `<lora:fox:0.8>` is kind "lora", args ("fox", "0.8")."""
    kind: str
    args: tuple[str, ...]


def extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its `<kind:args>` tags (of any kind, as A1111), and the tags in order."""
    found: list[ExtraNetwork] = []

    def take(m: re.Match) -> str:
        found.append(ExtraNetwork(m.group(1), tuple(m.group(2).split(":"))))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


# -- 2. AND -----------------------------------------------------------------------------------
_AND = re.compile(r"\bAND\b")
# a part, then an optional ":weight" at its very end (surrounding white space dropped)
_PART_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def and_parts(prompt: str) -> list[tuple[str, float]]:
    """The prompt's AND parts with their weights (1 when none is written); a prompt without AND
    is one part, whose own trailing `:number` is its weight, as in A1111."""
    parts = []
    for part in _AND.split(prompt):
        m = _PART_WEIGHT.fullmatch(part)
        parts.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return parts


# -- 3. prompt editing and alternation ----------------------------------------------------------
@dataclass(frozen=True)
class _Edit:
    """[before:after:number]; before is None in the [after:number] form."""
    before: tuple | None
    after: tuple
    number: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of node tuples


class _Unparsed(Exception):
    """The schedule grammar does not accept the prompt."""


# plain text: anything but \ [ ] ( ) : |, or a backslash and the (non-newline) character after it
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# after the last colon of an edit: a number (Lark's SIGNED_NUMBER), blanks around it, the bracket
_EDIT_END = re.compile(r"\s*([+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+))\s*\]")
_STRAY = "[]():"  # accepted alone at the top level, as literal text


class _Parser:
    """Recursive descent over A1111's schedule grammar. Inside brackets, a bracket must open a
    construct; at the top level a bracket or colon that opens none is literal text. Results are
    memoised by position, so nesting costs linear time."""

    def __init__(self, text: str):
        self.text = text
        self._seqs: dict[int, tuple[tuple, int]] = {}

    def top(self) -> tuple:
        nodes, pos = [], 0
        while pos < len(self.text):
            seq, pos = self.seq(pos)
            nodes.extend(seq)
            if pos < len(self.text):
                if self.text[pos] not in _STRAY:
                    raise _Unparsed  # a "|" outside alternation, or a lone trailing backslash
                nodes.append(self.text[pos])
                pos += 1
        return tuple(nodes)

    def seq(self, pos: int) -> tuple[tuple, int]:
        """The longest run of items from pos: plain text and bracketed constructs."""
        if pos not in self._seqs:
            nodes, end = [], pos
            while (item := self.item(end)) is not None:
                nodes.extend(item[0])
                end = item[1]
            self._seqs[pos] = (tuple(nodes), end)
        return self._seqs[pos]

    def item(self, pos: int) -> tuple[tuple, int] | None:
        c = self.text[pos:pos + 1]
        if c == "[":
            return self.edit(pos) or self.alternate(pos) or self.group(pos, "[", "]")
        if c == "(":
            return self.group(pos, "(", ")")
        m = _PLAIN.match(self.text, pos)
        return ((m.group(),), m.end()) if m else None

    def edit(self, pos: int) -> tuple[tuple, int] | None:
        first, p = self.seq(pos + 1)
        if self.text[p:p + 1] != ":":
            return None
        second, q = self.seq(p + 1)
        if self.text[q:q + 1] == ":" and (m := _EDIT_END.match(self.text, q + 1)):
            return (_Edit(first, second, m.group(1)),), m.end()
        if m := _EDIT_END.match(self.text, p + 1):
            return (_Edit(None, first, m.group(1)),), m.end()
        return None

    def alternate(self, pos: int) -> tuple[tuple, int] | None:
        option, p = self.seq(pos + 1)
        options = [option]
        while self.text[p:p + 1] == "|":
            option, p = self.seq(p + 1)
            options.append(option)
        if len(options) < 2 or self.text[p:p + 1] != "]":
            return None
        return (_Alternate(tuple(options)),), p + 1

    def group(self, pos: int, opening: str, closing: str) -> tuple[tuple, int] | None:
        """(x), (x:y) or [x]: kept as written, its inside still scheduled."""
        inner, p = self.seq(pos + 1)
        if opening == "(" and self.text[p:p + 1] == ":":
            weight, q = self.seq(p + 1)
            inner, p = (*inner, ":", *weight), q
        if self.text[p:p + 1] != closing:
            return None
        return (opening, *inner, closing), p + 1


def _switch_step(number: str, steps: int) -> int:
    """The last step of an edit's before-text: a fraction of the steps when the number has a
    decimal point, else a step number; at most `steps`."""
    value = float(number) * steps if "." in number else float(number)
    return int(max(min(value, steps), -1.0))


def _switch_steps(nodes: tuple, steps: int) -> set[int]:
    found = set()
    for node in nodes:
        if isinstance(node, _Edit):
            if (when := _switch_step(node.number, steps)) >= 1:
                found.add(when)
            found |= _switch_steps(node.before or (), steps) | _switch_steps(node.after, steps)
        elif isinstance(node, _Alternate):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _switch_steps(option, steps)
    return found


def _text_at(nodes: tuple, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Edit):
            chosen = node.before or () if step <= _switch_step(node.number, steps) else node.after
            out.append(_text_at(chosen, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(node)
    return "".join(out)


def schedule(prompt: str, steps: int) -> tuple[tuple[int, str], ...]:
    """((last step, prompt), ...): the prompt to use up to each step (steps counted from 1),
    the last entry ending at `steps` (A1111's prompt schedule)."""
    try:
        nodes = _Parser(prompt).top()
    except (_Unparsed, RecursionError):
        return ((steps, prompt),)
    ends = sorted(_switch_steps(nodes, steps) | {steps})
    return tuple((end, _text_at(nodes, end, steps)) for end in ends)


# -- 4. emphasis ------------------------------------------------------------------------------
BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # marks a BREAK fragment; brackets around it multiply it, as in A1111, and
# the word BREAK is then encoded as text
_EMPHASIS_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: that character
  | \\                      # a lone backslash: nothing
  | [(\[)\]]                # a bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":weight)" closing a round bracket
  | [^\\()\[\]:]+           # text
  | :                       # a colon that closes nothing: text
""", re.X)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


def emphasis(text: str) -> list[tuple[str, float]]:
    """Weighted fragments of a prompt, adjacent equal weights joined (A1111's attention parse)."""
    frags: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []
    for m in _EMPHASIS_TOKEN.finditer(text):
        token = m.group(0)
        if token[0] == "\\":
            frags.append([token[1:], 1.0])
        elif token in "([":
            (open_round if token == "(" else open_square).append(len(frags))
        elif m.group(1) is not None and open_round and _is_number(m.group(1)):
            _multiply(frags, open_round.pop(), float(m.group(1)))
        elif token == ")" and open_round:
            _multiply(frags, open_round.pop(), ROUND)
        elif token == "]" and open_square:
            _multiply(frags, open_square.pop(), SQUARE)
        else:
            _add_text(frags, token)
    for start in open_round:  # unclosed brackets close at the end, round ones first
        _multiply(frags, start, ROUND)
    for start in open_square:
        _multiply(frags, start, SQUARE)
    return _joined(frags) if frags else [("", 1.0)]


def _is_number(text: str) -> bool:
    try:  # A1111 fails on "(x:1.2.3)"; here the text stays literal
        float(text)
        return True
    except ValueError:
        return False


def _multiply(frags: list[list], start: int, factor: float) -> None:
    for frag in frags[start:]:
        frag[1] *= factor


def _add_text(frags: list[list], text: str) -> None:
    for i, piece in enumerate(_BREAK_WORD.split(text)):
        if i:
            frags.append([BREAK, BREAK_WEIGHT])
        frags.append([piece, 1.0])


# A run of letters or one digit: CLIP's tokenizer makes at least one token of each.
_LEAST_TOKEN = re.compile(r"[^\W\d_]+|\d")


def least_chunks(text: str, size: int = 75) -> int:
    """The chunks of `size` tokens a prompt takes at the least (each word or digit a token at the
    least, each BREAK closing a chunk), told without a tokenizer, so a prompt far too long is
    refused before any model loads. The whole text counts, AND parts and edits alike."""
    return sum(max(1, -(-len(_LEAST_TOKEN.findall(piece)) // size)) for piece in _BREAK_WORD.split(text))


def _joined(frags: list[list]) -> list[tuple[str, float]]:
    out: list[list] = []
    for text, weight in frags:
        if out and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(text, weight) for text, weight in out]


# -- 5. limits --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)  # a batch validates each line's prompts, often the same ones
def weight_problem(text: str, steps: int, positive: bool) -> tuple[str, str] | None:
    """(the rule broken, the value that breaks it) when `text` nests brackets deeper than
    MAX_PROMPT_NESTING, or weighs a word or (in a positive prompt) an AND part beyond
    MAX_PROMPT_WEIGHT, inf and nan included; None when it does neither. Words are weighed in
    every prompt its schedule over `steps` gives, as they are encoded."""
    text = extra_networks(text)[0] if positive else text
    if "(" not in text and "[" not in text and "AND" not in text:
        return None  # plain words all weigh 1 (the common case, and a batch checks every line)
    if (depth := _nesting(text)) > MAX_PROMPT_NESTING:  # checked first: emphasis is quadratic in it
        return f"may nest brackets at most {MAX_PROMPT_NESTING} deep", str(depth)
    bound = f"-{MAX_PROMPT_WEIGHT} to {MAX_PROMPT_WEIGHT}"
    for part, weight in and_parts(text) if positive else [(text, 1.0)]:
        if not -MAX_PROMPT_WEIGHT <= weight <= MAX_PROMPT_WEIGHT:
            return f"may weight an AND part by {bound}", f"{weight:g} on {_short(part.strip())!r}"
        for prompt in dict.fromkeys(prompt for _, prompt in schedule(part, steps)):  # each distinct one, in order
            for fragment, w in emphasis(prompt):
                if not -MAX_PROMPT_WEIGHT <= w <= MAX_PROMPT_WEIGHT:
                    return f"may weight words by {bound} (nested brackets multiply)", f"{w:g} on {_short(fragment)!r}"
    return None


def _nesting(text: str) -> int:
    """The most brackets open at once, as `emphasis` opens and closes them."""
    opened, deepest = {"(": 0, "[": 0}, 0
    for m in _EMPHASIS_TOKEN.finditer(text):
        token = m.group(0)
        closes = "(" if token == ")" or (m.group(1) is not None and _is_number(m.group(1))) else \
            "[" if token == "]" else None
        if token in opened:
            opened[token] += 1
        elif closes and opened[closes]:
            opened[closes] -= 1
        deepest = max(deepest, sum(opened.values()))
    return deepest


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
