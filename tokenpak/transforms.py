"""Text transforms: small pure functions, each one a str -> str rewrite of one block.

Why they live apart from compression.py. Each transform here is measured on its own
(exact o200k_base counts on ../shared/corpus), tested on its own (tests/test_transforms.py)
and knows nothing about requests, roles, cache markers or memoisation: that is
compression.py, which decides which blocks may be touched and chains these in a fixed
order. Keeping them pure is what makes a block's output depend on its text alone, so a
resent history compresses byte-identically and the provider's prompt cache survives.

split_segments cuts a block into whole-line segments judged on their own: code (fenced,
unfenced paragraphs, numbered listings of code), JSON, numbered listings of anything else
(a log read with Claude Code's Read: "     1\t<line>" or "     1→<line>") and other
text. One message pasting a JSON dump, a log and a code block is three kinds of content,
not one judged by its first lines. Listings are rewritten line by line with their numbers
kept (map_listing, collapse_listing: "12-3011\t<line> [×3000]", ditto_listing).

Transforms, in pipeline order, with what each saved on ../shared/corpus (exact o200k_base
counts, share of all 290,209 prompt tokens of the 18 cases, hybrid unless noted):
    ansi        strip ANSI escape sequences                        7.5%  strict+
    whitespace  CRLF -> LF, trailing spaces/tabs                   0.2%  strict+ (lossless, cheap)
    redraws     "\\r" progress redraws -> their final state        0.0%  strict+ (no "\\r" in the
                                                                         corpus; a pip/curl log is
                                                                         mostly redraws)
    repeats     runs of identical lines -> line + " [×N]"          9.9%  strict+ (in a numbered
                                                                         listing, with the range)
    paths       `path:line:text` runs naming one file -> the       0.4%  strict+ (ripgrep's
                path once, then `line:text`                              --heading layout)
    json        minify JSON text, byte-exact tokens                5.0%  strict+ (19.5% median per
                                                                         JSON block; preserve_json)
    table       uniform object arrays -> {"columns","rows"}        2.3%  hybrid+ (reversible)
    backref     repeated block or JSON array element -> a          7.3%  hybrid+
                reference naming the first copy, which stays
    timestamps  a log line's timestamp equal to the one above      6.2%  hybrid+ (reversible)
                -> "〃", with a one-line legend
    elide       middle of tool outputs > 12,000 chars -> a        18.5%  aggressive only
                marker with the lines/characters cut
Over the agent-session, json-tools and code-review cases hybrid saves 40.7% (40.3% before
"paths"): 31.1% with the issue's list alone, 33.8% with element references, 37.6% with
timestamps. On the Claude Code requests of tests/corpus/agents (whose system prompt and
tools, 24% of their tokens, are never altered) hybrid saves 32.2%.
"backref" (whole repeated blocks) spans messages, so it lives in compression.py; element
references use json_elements / json_with_refs from here.
Measured and dropped (on hybrid output): collapsing blank-line runs 0.00% (a run of
newlines is one token), collapsing inner space runs in prose 0.32% and dedenting prose
0.52% (both break alignment), tabs for code indentation 0.47% (code must stay exact).
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Tuple

from . import tokens

MIN_TABLE_ROWS = 3         # fewer rows rarely repay the {"columns","rows"} wrapper
MIN_ELEMENT_REF_CHARS = 160  # a JSON element reference costs ~25 tokens
ELIDE_MIN_CHARS = 12000    # "very long" tool output (~3k tokens)
ELIDE_KEEP_CHARS = 2500    # kept at each end when eliding
ELIDE_KEEP_IMPORTANT = 40  # error/warning lines kept from the elided middle
REPEAT_MARK = " [×{}]"


# ------------------------------------------------------------------ line transforms

# CSI (colours, cursor), OSC (window title; only when terminated, so an unterminated one
# cannot swallow text) and two-character escapes.
_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_TRAILING_RE = re.compile(r"(?<![ \t])[ \t]+(?=\n|\Z)")


def strip_ansi(text: str) -> str:
    """Remove ANSI colour/cursor escape sequences (terminal output pasted into a prompt)."""
    while "\x1b" in text:  # until stable: removing one can join the pieces of another
        stripped = _ANSI_RE.sub("", text)
        if stripped == text:
            break
        text = stripped
    return text


def normalize_whitespace(text: str) -> str:
    """CRLF -> LF and drop spaces/tabs at line ends; nothing else (runs are 1 token anyway)."""
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    return _TRAILING_RE.sub("", text)


def collapse_redraws(text: str) -> str:
    """Keep only the final state of lines redrawn with carriage returns (progress bars).

    Only in multi-line text: a block with "\\r" and no "\\n" may be old Mac line endings.
    """
    if "\r" not in text or "\n" not in text:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "\r" in line:
            # Each "\r" returns to column 0 and progress bars redraw the whole line, so the
            # last non-blank state is what the terminal showed.
            states = [part for part in line.split("\r") if part.strip()]
            lines[i] = states[-1].rstrip(" \t") if states else ""
    return "\n".join(lines)


_REPEAT_RE = re.compile(r"^(.*) \[×(\d+)\]$")


def _parse_repeat(line):
    match = _REPEAT_RE.match(line) if line.endswith("]") else None
    if match and int(match.group(2)) >= 2:
        return match.group(1), int(match.group(2))
    return line, 1


def collapse_repeats(text: str) -> str:
    """Runs of identical non-blank lines -> one line + " [×N]" when that saves text.

    Lines already carrying a marker merge with equal neighbours, so it is idempotent.
    """
    if "\n" not in text:
        return text
    lines = text.split("\n")
    # Fast exit (C-speed comparisons) for the common case: no run, no earlier marker.
    if " [×" not in text and not any(a == b for a, b in zip(lines, lines[1:])):
        return text
    out, i, n = [], 0, len(lines)
    while i < n:
        base, total = _parse_repeat(lines[i])
        j = i + 1
        while j < n and base.strip():
            other, count = _parse_repeat(lines[j])
            if other != base:
                break
            total += count
            j += 1
        # Collapse only when the saved copies outweigh the marker (~4 tokens).
        if j - i > 1 and (total - 1) * (len(base) + 1) >= 16:
            out.append(base + REPEAT_MARK.format(total))
        else:
            out.extend(lines[i:j])
        i = j
    result = "\n".join(out)
    return text if result == text else result


# ------------------------------------------------------------------ search output

# grep -n / ripgrep output: "path:line:text" (or "path:line-text" for context lines). A
# path has a "/" or "." so "12:30:00 ..." and "174:def f():" are not taken for one.
_SEARCH_LINE = re.compile(r"([^\s:]*[./][^\s:]*):(\d+)([:-])(.*)\Z", re.S)
MIN_SEARCH_GROUP = 3


def group_search_output(text: str) -> str:
    """Runs of `path:line:text` lines naming one file -> the path once, then `line:text`.

    ripgrep's --heading layout: every line number and text is kept, the path is written
    once per run of >= 3 lines instead of on every line. Idempotent (grouped lines no
    longer start with a path).
    """
    if "\n" not in text or ":" not in text:
        return text
    lines = text.split("\n")
    out, i, n = [], 0, len(lines)
    while i < n:
        match = _SEARCH_LINE.match(lines[i])
        j = i + 1
        while match and j < n:
            other = _SEARCH_LINE.match(lines[j])
            if other is None or other.group(1) != match.group(1):
                break
            j += 1
        if match is None or j - i < MIN_SEARCH_GROUP:
            out.extend(lines[i:j])
        else:
            out.append(match.group(1))
            out.extend(lines[k][len(match.group(1)) + 1:] for k in range(i, j))
        i = j
    result = "\n".join(out)
    return text if result == text else result


# ------------------------------------------------------------------ timestamps

DITTO = "\u3003"  # 〃, the ditto mark
DITTO_LEGEND = ("[tokenpak: a line starting with \u3003 has the timestamp of the nearest line "
                "above that shows one]")
_TIMESTAMP = (r"\[?(?:\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?"
              r"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)\]?")
_TIMESTAMP_RE = re.compile("(%s) " % _TIMESTAMP)
_TIMESTAMP_ANY = re.compile("^%s " % _TIMESTAMP, re.M)


def ditto_timestamps(text: str) -> str:
    """Log lines repeating the timestamp above them -> "〃 " + the rest, plus a legend line.

    A timestamp is ~12 o200k tokens, the mark 2. Exactly reversible: skipped when the
    text already holds a ditto mark (so it is also idempotent).
    """
    if "\n" not in text or DITTO in text or not _TIMESTAMP_ANY.search(text):
        return text
    lines = text.split("\n")
    current, hits, first = None, 0, None  # current: the timestamp the reader last saw
    for i, line in enumerate(lines):
        match = _TIMESTAMP_RE.match(line)
        if match is None:
            continue
        if match.group(1) == current:
            lines[i] = DITTO + " " + line[match.end():]
            hits += 1
        else:
            current = match.group(1)
            first = i if first is None else first
    if hits < 4:  # the legend costs ~22 tokens
        return text
    lines.insert(first, DITTO_LEGEND)  # right above the log it explains
    return "\n".join(lines)

# ------------------------------------------------------------------ long output

_ELIDED = "elided from the middle of this output by tokenpak"
_IMPORTANT_RE = re.compile(r"^.*(?:error|fail|exception|traceback|fatal|panic|warn)", re.I | re.M)


def _important_lines(text):
    """Indices of the first ELIDE_KEEP_IMPORTANT lines of `text` naming an error or warning."""
    found, line, pos = [], 0, 0
    for match in _IMPORTANT_RE.finditer(text):
        line += text.count("\n", pos, match.start())
        pos = match.start()
        found.append(line)
        if len(found) == ELIDE_KEEP_IMPORTANT:
            break
    return found


def elide_middle(text: str) -> str:
    """Cut the middle of a very long output, keep its ends and error/warning lines.

    Output that already carries the marker is left alone (idempotent).
    """
    if len(text) < ELIDE_MIN_CHARS or text.count("\n") < 20 or _ELIDED in text:
        return text
    lines = text.split("\n")
    head, size = 0, 0
    while head < len(lines) and size + len(lines[head]) < ELIDE_KEEP_CHARS:
        size += len(lines[head]) + 1
        head += 1
    tail, size = len(lines), 0
    while tail > head and size + len(lines[tail - 1]) < ELIDE_KEEP_CHARS:
        size += len(lines[tail - 1]) + 1
        tail -= 1
    middle = lines[head:tail]
    # Errors and warnings are what a long log is usually read for: keep them in place.
    keep = _important_lines("\n".join(middle))
    out, start = lines[:head], 0
    for i in keep + [len(middle)]:
        gap = middle[start:i]
        if gap:
            out.append("[... %s lines (%s characters) %s ...]" % (
                format(len(gap), ","), format(sum(len(g) + 1 for g in gap), ","), _ELIDED))
        if i < len(middle):
            out.append(middle[i])
        start = i + 1
    out.extend(lines[tail:])
    result = "\n".join(out)
    return result if len(result) < len(text) else text

# ------------------------------------------------------------------ JSON

_JSON_STRING_OR_SPACE = re.compile(r'("(?:[^"\\]|\\.)*")|[ \t\n\r]+', re.S)


_JSON_START = re.compile(r"\s*[\[{]")


def parse_json_text(text: str):
    """The JSON value of a block that is a JSON object/array, else None (cheap reject)."""
    if not _JSON_START.match(text):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


_WHITESPACE = str.maketrans("", "", " \t\n\r")


def dumps_compact(value):
    """`value` as compact JSON (no spaces, non-ASCII kept): the canonical form here."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_minified(text, value):
    """(minified text, whether it is also the canonical serialisation of `value`)."""
    canonical = dumps_compact(value)
    # Same characters apart from whitespace: then dropping the text's whitespace outside
    # strings yields exactly `canonical` (C-speed path for the common case).
    if canonical.translate(_WHITESPACE) == text.translate(_WHITESPACE):
        return canonical, True
    minified = _JSON_STRING_OR_SPACE.sub(lambda m: m.group(1) or "", text)
    return minified, minified == canonical


def minify_json(text: str) -> str:
    """Drop whitespace outside strings of JSON text: every token kept byte for byte."""
    value = parse_json_text(text)
    return text if value is None else json_minified(text, value)[0]


def _is_table(value):
    return isinstance(value, dict) and list(value) == ["columns", "rows"]


def _contains_table_shape(value, canonical):
    if '{"columns":' not in canonical:  # cheap and exact: how such an object serialises
        return False

    def walk(node):
        if isinstance(node, dict):
            return _is_table(node) or any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)
    return walk(value)


_CONTAINERS = (dict, list)


class ElementRef(str):
    """A back-reference string standing in for a repeated JSON array element."""


def _uniform_keys(value):
    """The shared key list of an array of objects, if it can become a table."""
    if not isinstance(value, list):
        return None
    # Key order must match too: decoding rebuilds each object in column order.
    items = [item for item in value if not isinstance(item, ElementRef)]
    if len(items) < MIN_TABLE_ROWS or not isinstance(items[0], dict) or not items[0]:
        return None
    keys = list(items[0])
    for item in items:
        if not isinstance(item, dict) or list(item) != keys:
            return None
    return keys


def table_encode(value):
    """Re-encode arrays of >= 3 objects sharing one key list as {"columns": keys, "rows": [...]}.

    An ElementRef in such an array stays a (string) row of its own.
    """
    if isinstance(value, dict):
        return {k: _encode_cell(v) for k, v in value.items()}
    if isinstance(value, list):
        keys = _uniform_keys(value)
        if keys is None:
            return [_encode_cell(v) for v in value]
        return {"columns": keys, "rows": [
            item if isinstance(item, ElementRef) else [_encode_cell(item[k]) for k in keys]
            for item in value]}
    return value


def _encode_cell(value):
    return table_encode(value) if isinstance(value, _CONTAINERS) else value


def table_decode(value):
    """Exact inverse of `table_encode` (on values without a {"columns","rows"} object)."""
    if isinstance(value, dict):
        if _is_table(value):
            keys = value["columns"]
            return [{k: table_decode(cell) for k, cell in zip(keys, row)} if isinstance(row, list)
                    else row for row in value["rows"]]
        return {k: table_decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [table_decode(v) for v in value]
    return value


def tabulate_value(minified, value, canonical):
    """`tabulate_json` for already parsed JSON: `canonical` says `minified` is exact."""
    if not canonical or _contains_table_shape(value, minified):
        return minified
    encoded = dumps_compact(table_encode(value))
    return encoded if len(encoded) < len(minified) else minified


def tabulate_json(text: str) -> str:
    """Minified JSON text with uniform object arrays as tables, when exactly reversible.

    Applies only if the text is canonical minified JSON (so decoding the table and
    re-serialising gives the same bytes) and holds no object already shaped like a table.
    """
    value = parse_json_text(text)
    if value is None or dumps_compact(value) != text:
        return text
    return tabulate_value(text, value, True)

# ------------------------------------------------------------------ JSON elements

def json_elements(text: str):
    """[(path, digest, size)] of objects/arrays inside arrays of canonical JSON, pre-order.

    A path is a tuple of keys and indices. None when the text is not JSON, not canonical
    (re-serialising would change bytes) or already holds a table: element references
    apply only where they are exact.
    """
    value = parse_json_text(text)
    if value is None:
        return None
    minified, canonical = json_minified(text, value)
    if not canonical or _contains_table_shape(value, minified):
        return None
    out = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, child in node.items():
                if isinstance(child, _CONTAINERS):
                    walk(child, path + (key,))
            return
        for i, child in enumerate(node):
            if isinstance(child, _CONTAINERS):
                dumped = dumps_compact(child)
                if len(dumped) >= MIN_ELEMENT_REF_CHARS:  # smaller ones hold no big ones
                    out.append((path + (i,), tokens.digest(dumped), len(dumped)))
                    walk(child, path + (i,))

    if isinstance(value, _CONTAINERS):
        walk(value, ())
    return tuple(out)


def path_text(path) -> str:
    """A JSON path tuple as a model reads it: items[3].deps[0]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += "[%d]" % part
        else:
            name = part if re.match(r"^[A-Za-z_][\w-]*$", part) else json.dumps(part)
            out += ("." if out else "") + name
    return out or "$"


def json_with_refs(text: str, refs: Dict[tuple, str], table: bool) -> str:
    """Canonical JSON `text` with the elements at `refs` paths replaced by reference strings."""
    on_path = {path[:i] for path in refs for i in range(len(path))}

    def rebuild(node, path):
        if path in refs:
            return ElementRef(refs[path])
        if path not in on_path:
            return node  # untouched subtree: shared, not copied
        if isinstance(node, dict):
            return {k: rebuild(v, path + (k,)) for k, v in node.items()}
        return [rebuild(v, path + (i,)) for i, v in enumerate(node)]

    value = rebuild(json.loads(text), ())
    return dumps_compact(table_encode(value) if table else value)

# ------------------------------------------------------------------ segments

# A fence line opens or closes fenced code (CommonMark: up to 3 spaces of indentation).
_FENCE_OPEN = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[^\n]*$", re.M)
# A numbered listing line: `cat -n` and Claude Code's Read ("     1\t<line>", or
# "     1→<line>"); "12-3011\t" is a collapsed run (see collapse_listing).
_LISTING_RE = re.compile(r"( *)(\d+)(?:-(\d+))?([\t\u2192])(.*)\Z", re.S)
_CODE_START = re.compile(
    r"\s*(?:\d+[:|] |def |class |import |from \S+ import|return\b|if |elif |else\b|for |"
    r"while |try:|except\b|@\w|#include|#define|function\b|const |let |var |public |private |"
    r"static |func |fn |package |[}\])]|//|/\*|\* )")
_CODE_END = ("{", "}", ";", ":", ",", "(", ")", "[", "]", "=", "\\", "=>", "->")
# Lines that are output, never code, whatever they end with: log lines (a timestamp, a
# level, a [tag] or a ditto mark first) and `path:line:` search output.
_OUTPUT_LINE = re.compile(
    r"\s*(?:%s|\d\d:\d\d:\d\d|(?:TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|FATAL|CRITICAL)\b"
    r"|\[[\w .:/-]+\] |%s|[\w./-]+:\d+[:-])" % (_TIMESTAMP, DITTO))
_MARK_RE = re.compile(r" \[×\d+\]$")
_JSON_DECODER = json.JSONDecoder()

CODE, LISTING, JSON, TEXT = "code", "listing", "json", "text"


def _visible(line):
    """A line as a terminal shows it: no escapes, no trailing blanks, no redrawn states."""
    if "\x1b" in line:
        line = strip_ansi(line)
    if "\r" in line:  # as collapse_redraws: the last non-blank state
        states = [part for part in line.split("\r") if part.strip()]
        line = states[-1] if states else ""
    return line.rstrip()


def _codey(line):
    if _OUTPUT_LINE.match(line) or line == DITTO_LEGEND:
        return False
    if line.endswith("]"):
        line = _MARK_RE.sub("", line)
    return line.endswith(_CODE_END) or _CODE_START.match(line) is not None


def looks_like_code(text: str, share: float = 0.5) -> bool:
    """Heuristic: is this text source code (or a numbered listing of it)?

    Terminal output (it has ANSI escapes) never is. Otherwise `share` of the distinct
    non-blank lines among the first 300 must start or end like code; log lines and
    `path:line:` search output never count, and a run of repeats of one or two lines is
    output, not code (a log line "... (attempt 3/5)" ends like a call but repeats).
    """
    if "\x1b" in text:
        return False
    lines = []
    for line in text.split("\n", 300)[:300]:
        listed = _LISTING_RE.match(line)
        line = (listed.group(5) if listed else line).rstrip()
        if line.strip():
            lines.append(line)
    distinct = set(lines)
    if len(lines) >= 3 and len(distinct) < 3:
        return False
    codey = sum(1 for line in distinct if _codey(line))
    # Two code-like lines at least: "Look at this:" alone is prose ending in a colon.
    return codey >= 2 and codey >= share * len(distinct)


# How a JSON object or array can begin: a cheap filter before the decoder, whose errors
# cost a scan of the text up to where they happened ("[worker-0]", "[2025-06-24 ...").
_JSON_OPENING = re.compile(r'\{\s*["}]|\[\s*(?:["{\[\]]|true\b|false\b|null\b'
                           r'|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\s*[,\]])')


def _json_end(text, start):
    """End offset of a JSON object/array starting at `start` and ending a line, else -1."""
    if not _JSON_OPENING.match(text, start):
        return -1
    try:
        value, end = _JSON_DECODER.raw_decode(text, start)
    except ValueError:
        return -1
    if not isinstance(value, (dict, list)):
        return -1
    newline = text.find("\n", end)
    rest = text[end:] if newline < 0 else text[end:newline]
    return end if not rest.strip(" \t\r") else -1


# Lines that may start a fence, a JSON value or a listing: found at C speed, so a long
# log costs one regex scan plus its paragraph judgement, not a Python step per line.
_SPECIAL_LINE = re.compile(r"^(?:[ \t]{0,3}(?:```|~~~)|%s| *\d+(?:-\d+)?[\t\u2192])"
                           % _JSON_OPENING.pattern, re.M)
_LISTING_RUN = re.compile(r"(?: *\d+(?:-\d+)?[\t\u2192][^\n]*(?:\n|\Z))+")


def split_segments(text: str, code: bool = True) -> List[Tuple[str, str]]:
    """Split text into (kind, chunk) segments of whole lines; "\n".join(chunks) == text.

    Kinds: CODE (fenced code, code paragraphs, numbered listings of code), LISTING (a
    numbered listing of anything else: a log read with Claude Code's Read or `cat -n`),
    JSON (a JSON object/array starting a line at column 0 and ending a line), TEXT
    (prose, logs, search and test output). Each is judged on its own lines, so a message
    pasting JSON, then a log, then code gets the right treatment for each part. With
    `code` false (preserve_code off) nothing is CODE: fences are text, listings LISTING.
    """
    lines = text.split("\n")
    ranges = []          # (kind, first line, end line) in order
    plain = taken = 0    # start of the current plain run; lines before `taken` are judged
    line_no = pos = 0
    for match in _SPECIAL_LINE.finditer(text):
        line_no += text.count("\n", pos, match.start())
        pos = match.start()
        if line_no < taken:
            continue  # inside a fence, JSON value or listing already found
        kind, start, end = _special_segment(text, lines, line_no, pos, plain, code)
        if kind is None:
            continue
        ranges.extend(_plain_ranges(lines, plain, start, code))
        ranges.append((kind, start, end))
        plain = taken = end
    ranges.extend(_plain_ranges(lines, plain, len(lines), code))
    out = []
    for kind, start, end in ranges:
        if out and out[-1][0] == kind and kind != JSON:  # two JSON values never merge
            out[-1][2] = end
        elif end > start:
            out.append([kind, start, end])
    return [(kind, "\n".join(lines[start:end])) for kind, start, end in out]


def _special_segment(text, lines, i, offset, plain, code):
    """(kind, first line, end line) of a fence, JSON value or listing at line i, or Nones."""
    line, n = lines[i], len(lines)
    fence = _FENCE_OPEN.match(line) if code else None
    if fence is not None:
        closing = re.compile(r"[ \t]{0,3}%s{%d,}[ \t]*\Z" % (re.escape(fence.group(1)[0]),
                                                            len(fence.group(1))))
        end = next((j for j in range(i + 1, n) if closing.match(lines[j])), n - 1) + 1
        return CODE, i, end
    if line[:1] in ("{", "["):
        stop = _json_end(text, offset)
        if stop >= 0:
            return JSON, i, i + text.count("\n", offset, stop) + 1
        return None, i, i
    run = _LISTING_RUN.match(text, offset)
    if run is None:
        return None, i, i
    # Lines in the run: its newlines, plus one if the text ends inside it.
    end = i + text.count("\n", offset, run.end()) + (not run.group().endswith("\n"))
    if end - i < 2:
        return None, i, i
    if i > plain and lines[i - 1] == DITTO_LEGEND:
        i -= 1  # the legend of this listing's ditto marks belongs to it
    # A file read with line numbers: a quarter of code-like lines is code (a module with
    # long docstrings); a log listing has next to none.
    if not code:
        return LISTING, i, end
    return (CODE if looks_like_code("\n".join(lines[i:end]), 0.25) else LISTING), i, end


def _plain_ranges(lines, start, end, code=True):
    """(kind, first, end) runs of a plain region: each blank-separated paragraph judged alone.

    Blank lines (blank as a terminal shows them) go with the paragraph before them.
    """
    if end <= start:
        return []
    if not code:
        return [(TEXT, start, end)]
    region = lines[start:end]
    visible, joined = region, "\n".join(region)
    if "\x1b" in joined:  # one pass, not one per line; no escape sequence holds a newline
        visible = strip_ansi(joined).split("\n")
    blank = [not (_visible(line) if "\r" in line else line).strip() for line in visible]
    out, i, n = [], 0, len(region)
    while i < n:
        j = i
        while j < n and not blank[j]:
            j += 1
        kind = CODE if j > i and looks_like_code("\n".join(region[i:j])) else TEXT
        while j < n and blank[j]:
            j += 1
        out.append((kind, start + i, start + j))
        i = j
    return out


# ------------------------------------------------------------------ numbered listings

def _listing_rows(text):
    """(legend line or None, [(indent, first, last, separator, content)]) of a LISTING chunk."""
    lines = text.split("\n")
    legend = lines.pop(0) if lines and lines[0] == DITTO_LEGEND else None
    rows = []
    for line in lines:
        indent, first, last, sep, content = _LISTING_RE.match(line).groups()
        rows.append((indent, first, last or first, sep, content))
    return legend, rows


def _listing_text(legend, rows):
    lines = [] if legend is None else [legend]
    for indent, first, last, sep, content in rows:
        lines.append("%s%s%s%s%s" % (indent, first, "" if last == first else "-" + last, sep,
                                     content))
    return "\n".join(lines)


def map_listing(text: str, function) -> str:
    """Apply a str -> str `function` to the content of every line of a numbered listing."""
    legend, rows = _listing_rows(text)
    out = _listing_text(legend, [row[:4] + (function(row[4]),) for row in rows])
    return text if out == text else out


def final_state(line: str) -> str:
    """One line's final state after "\r" redraws, without trailing blanks."""
    return normalize_whitespace(collapse_redraws(line + "\n"))[:-1] if "\r" in line \
        else normalize_whitespace(line)


def collapse_listing(text: str) -> str:
    """Runs of identical lines in a numbered listing -> one line with the run's line range.

    "12\tx" ... "3011\tx" becomes "12-3011\tx [×3000]": every line number the model
    could cite is still there, with its text. Only consecutive line numbers merge, and
    only when the copies dropped outweigh the range and the marker. Idempotent.
    """
    legend, rows = _listing_rows(text)
    groups = []
    for row in rows:
        if groups:
            last = groups[-1][-1]
            base = _parse_repeat(last[4])[0]
            if (base.strip() and _parse_repeat(row[4])[0] == base and row[3] == last[3]
                    and int(row[1]) == int(last[2]) + 1):
                groups[-1].append(row)
                continue
        groups.append([row])
    out = []
    for group in groups:
        head, tail = group[0], group[-1]
        merged = (head[0], head[1], tail[2], head[3], _parse_repeat(head[4])[0]
                  + REPEAT_MARK.format(int(tail[2]) - int(head[1]) + 1))
        if len(group) > 1 and (len(_listing_text(None, group))
                               - len(_listing_text(None, [merged]))) >= 24:
            out.append(merged)
        else:
            out.extend(group)
    result = _listing_text(legend, out)
    return text if result == text else result


def ditto_listing(text: str) -> str:
    """`ditto_timestamps` over the contents of a numbered listing; the legend goes first."""
    legend, rows = _listing_rows(text)
    if legend is not None:
        return text
    contents = ditto_timestamps("\n".join(row[4] for row in rows)).split("\n")
    if len(contents) == len(rows):
        return text
    contents.remove(DITTO_LEGEND)  # numbered lines stay numbered: the legend goes first
    return _listing_text(DITTO_LEGEND, [row[:4] + (c,) for row, c in zip(rows, contents)])
