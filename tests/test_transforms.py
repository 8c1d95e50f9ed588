"""Unit tests for tokenpak.transforms: each pure str -> str transform on its own.

Example-based tests first, then a property test of the table encoding over generated JSON.
How compression.py chains these per block and per request is tested in test_compression.py.
"""

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from tokenpak import transforms as T

PROPS = settings(max_examples=60, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

LOG_LINE = "\x1b[32m[worker-1] heartbeat ok queue=0 lag=0ms\x1b[0m"
PRETTY = json.dumps({"items": [{"name": "pkg%d" % i, "version": "1.%d" % i, "files": i,
                                "summary": "a package with a fairly long summary %d" % i}
                               for i in range(6)]}, indent=4)


# ------------------------------------------------------------------ text transforms

def test_strip_ansi_removes_colour_cursor_and_title_sequences():
    text = "\x1b[1;31mERROR\x1b[0m done\x1b[2K\x1b]0;title\x07 ok"
    assert T.strip_ansi(text) == "ERROR done ok"
    plain = "no escapes here"
    assert T.strip_ansi(plain) is plain


def test_normalize_whitespace_crlf_and_trailing_only():
    assert T.normalize_whitespace("a  b   \r\nc\t\n  d  ") == "a  b\nc\n  d"


def test_collapse_redraws_keeps_final_state():
    text = "Downloading\n 10%\r 50%\r100%\r\ndone"
    assert T.collapse_redraws(T.normalize_whitespace(text)) == "Downloading\n100%\ndone"
    # No newline at all: could be old Mac line endings, so left alone.
    assert T.collapse_redraws("one\rtwo") == "one\rtwo"


def test_collapse_repeats_counts_runs_and_is_idempotent():
    text = "start\n" + "\n".join([LOG_LINE] * 5) + "\nend"
    out = T.collapse_repeats(T.strip_ansi(text))
    assert out == "start\n[worker-1] heartbeat ok queue=0 lag=0ms [×5]\nend"
    assert T.collapse_repeats(out) == out
    # A marker line next to more copies merges into one count.
    assert T.collapse_repeats(out.replace("\nend", "\n[worker-1] heartbeat ok queue=0 lag=0ms")) \
        == "start\n[worker-1] heartbeat ok queue=0 lag=0ms [×6]"


def test_collapse_repeats_leaves_short_and_blank_runs():
    assert T.collapse_repeats("}\n}\n\n\n\nx") == "}\n}\n\n\n\nx"
    assert T.collapse_repeats("solo [×1]\nnext") == "solo [×1]\nnext"


def test_minify_json_is_lexical_and_exact():
    assert T.minify_json('{\n  "a": "x  y",\n  "b": [1, 2.50, 1e5]\n}') == '{"a":"x  y","b":[1,2.50,1e5]}'
    assert T.minify_json("[worker-0] not json") == "[worker-0] not json"
    assert T.minify_json('{"broken": ') == '{"broken": '


def test_table_round_trip_is_exact():
    minified = T.minify_json(PRETTY)
    table = T.tabulate_json(minified)
    assert table != minified and len(table) < len(minified)
    assert '"columns":["name","version","files","summary"]' in table
    restored = T.table_decode(json.loads(table))
    assert json.dumps(restored, ensure_ascii=False, separators=(",", ":")) == minified


def test_table_nested_and_mixed_arrays_round_trip():
    value = {"a": [{"k": 1, "v": [{"x": 1}, {"x": 2}, {"x": 3}]}] * 3,
             "b": [{"k": 1}, {"j": 2}, {"k": 3}], "c": [1, 2, 3]}
    encoded = T.table_encode(value)
    assert T.table_decode(encoded) == value
    assert isinstance(encoded["b"], list)  # keys differ: not a table
    cells = [{"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 3}}] * 3  # a row must stay a list
    assert T.table_decode(T.table_encode(cells)) == cells


def test_tabulate_refuses_ambiguous_or_inexact_input():
    ambiguous = json.dumps([{"columns": ["a"], "rows": [[1]]}] * 3, separators=(",", ":"))
    assert T.tabulate_json(ambiguous) == ambiguous
    inexact = '[{"a":1.0e2},{"a":2},{"a":3}]'  # 1.0e2 would re-serialise as 100.0
    assert T.tabulate_json(inexact) == inexact


def test_elide_middle_keeps_ends_errors_and_says_how_much():
    lines = ["line %05d ok" % i for i in range(3000)]
    lines[1500] = "ERROR disk full on /dev/sda1"
    text = "\n".join(lines)
    out = T.elide_middle(text)
    assert out.startswith("line 00000 ok") and out.endswith("line 02999 ok")
    assert "ERROR disk full on /dev/sda1" in out
    assert "elided from the middle of this output by tokenpak" in out
    assert "lines (" in out and "characters)" in out
    assert len(out) < len(text) / 4
    assert T.elide_middle(out) == out
    assert T.elide_middle("short\noutput") == "short\noutput"


def _undo_ditto(text):
    lines = text.split("\n")[1:]  # drop the legend
    current = None
    for i, line in enumerate(lines):
        if line.startswith(T.DITTO + " "):
            lines[i] = current + " " + line[2:]
        else:
            match = T._TIMESTAMP_RE.match(line)
            current = match.group(1) if match else current
    return "\n".join(lines)


def test_ditto_timestamps_round_trip():
    text = "\n".join(["2026-05-09 07:29:12 status unpacked pkg%d" % i for i in range(6)]
                     + ["[worker-1] heartbeat", "2026-05-09 07:29:12 install other",
                        "2026-05-09 07:29:13 install third"])
    out = T.ditto_timestamps(text)
    assert out.startswith(T.DITTO_LEGEND + "\n")
    assert sum(line.startswith(T.DITTO + " ") for line in out.split("\n")) == 6
    assert "2026-05-09 07:29:13 install third" in out
    assert _undo_ditto(out) == text
    assert T.ditto_timestamps(out) == out
    assert T.ditto_timestamps("2026-05-09 07:29:12 a\n2026-05-09 07:29:12 b") == \
        "2026-05-09 07:29:12 a\n2026-05-09 07:29:12 b"  # too few to pay for the legend


def test_fences_and_code_detection():
    text = "intro  \n```python\nx = 1   \n```\noutro  "
    chunks = T.split_segments(text)
    assert "\n".join(c for _, c in chunks) == text
    assert [kind for kind, _ in chunks] == [T.TEXT, T.CODE, T.TEXT]
    unclosed = "intro\n~~~\nx = 1   "
    assert T.split_segments(unclosed) == [(T.TEXT, "intro"), (T.CODE, "~~~\nx = 1   ")]
    listing = "\n".join("%6d\t    return f(x%d)" % (i, i) for i in range(1, 20))
    assert T.looks_like_code(listing)
    assert T.looks_like_code("def f(x):\n    if x:\n        return 1\n    return 2\n")
    prose = "The proxy forwards requests.\nIt keeps every fact.\nNothing is lost here.\n"
    assert not T.looks_like_code(prose)
    assert not T.looks_like_code("\x1b[31mdef f():\x1b[0m\n    return 1\n    x = {\n")


def test_looks_like_code_is_not_fooled_by_logs_and_search_output():
    attempts = "\n".join(["retrying connection to db.internal:5432 (attempt 3/5)"] * 50)
    assert not T.looks_like_code(attempts)  # ends like a call, but one line repeated
    log = "\n".join("2026-11-23 10:00:%02d WARN upstream slow (attempt %d/5)" % (i, i % 5)
                    for i in range(20))
    assert not T.looks_like_code(log)
    grep = "\n".join("lib/http/cookies.py:%d:def f%d(self):" % (100 + i, i) for i in range(20))
    assert not T.looks_like_code(grep)
    assert not T.looks_like_code("Look at this:\nIt is slow.")  # one colon line is prose


def test_split_segments_judges_each_part_and_joins_back():
    dump = json.dumps({"service": "billing", "replicas": [1, 2, 3]}, indent=2)
    log = "\n".join("2026-11-23 10:00:01 INFO heartbeat ok (queue=0)" for _ in range(5))
    fenced = "```python\ndef f():   \n    return 1\n```"
    code = "def g(x):\n    if x:\n        return {}\n    return []"
    listing = "\n".join("%6d\t[worker-0] heartbeat ok" % i for i in range(1, 6))
    text = "\n".join(["The dump:", dump, "", "The log:", log, fenced, "", code, "", listing, "end"])
    segments = T.split_segments(text)
    assert "\n".join(chunk for _, chunk in segments) == text
    kinds = [kind for kind, _ in segments]
    assert kinds == [T.TEXT, T.JSON, T.TEXT, T.CODE, T.TEXT, T.CODE, T.LISTING, T.TEXT]
    assert segments[1][1] == dump and segments[3][1] == fenced
    code_listing = "\n".join("%6d\t    value = compute(%d)" % (i, i) for i in range(1, 9))
    assert T.split_segments(code_listing) == [(T.CODE, code_listing)]
    assert T.split_segments("[worker-0] not json\n[1, 2] [3]") == \
        [(T.TEXT, "[worker-0] not json\n[1, 2] [3]")]


def test_collapse_listing_keeps_every_line_number():
    lines = ["%6d\t%s" % (i, "[worker-0] heartbeat ok queue=0 lag=0ms") for i in range(12, 3012)]
    text = "     1\tstart\n" + "\n".join(lines) + "\n  3012\tend"
    out = T.collapse_listing(text)
    assert out == ("     1\tstart\n    12-3011\t[worker-0] heartbeat ok queue=0 lag=0ms [×3000]"
                   "\n  3012\tend")
    assert T.collapse_listing(out) == out
    gap = "5\tsame line here, long enough\n7\tsame line here, long enough"
    assert T.collapse_listing(gap) == gap  # lines 5 and 7: not a run
    short = "1\tok\n2\tok"
    assert T.collapse_listing(short) == short  # the range would cost more than it saves
    arrows = "\n".join("%6d\u2192%s" % (i, "GET /health 200 0.4ms") for i in range(1, 9))
    assert T.split_segments(arrows) == [(T.LISTING, arrows)]  # Claude Code's Read layout
    assert T.collapse_listing(arrows) == "     1-8\u2192GET /health 200 0.4ms [×8]"


def test_listing_content_transforms_keep_the_numbers():
    text = "\n".join("%d\t2026-05-09 07:29:12 \x1b[32mstep %d\x1b[0m   " % (i, i) for i in range(1, 8))
    clean = T.map_listing(T.map_listing(text, T.strip_ansi), T.normalize_whitespace)
    assert clean.split("\n")[0] == "1\t2026-05-09 07:29:12 step 1"
    dittoed = T.ditto_listing(clean)
    assert dittoed.split("\n")[:3] == [T.DITTO_LEGEND, "1\t2026-05-09 07:29:12 step 1",
                                       "2\t\u3003 step 2"]
    assert T.ditto_listing(dittoed) == dittoed
    assert T.split_segments(dittoed) == [(T.LISTING, dittoed)]  # the legend stays with it


def test_group_search_output_writes_each_path_once():
    text = "\n".join(["lib/a.py:12:def f(x):", "lib/a.py:13-    return x", "lib/a.py:40:def g():",
                      "lib/b.py:7:import re", "12:30:00 not a search line"])
    out = T.group_search_output(text)
    assert out == "\n".join(["lib/a.py", "12:def f(x):", "13-    return x", "40:def g():",
                             "lib/b.py:7:import re", "12:30:00 not a search line"])
    assert T.group_search_output(out) == out
    two = "lib/a.py:1:x\nlib/a.py:2:y"
    assert T.group_search_output(two) == two  # a header would save nothing


# ------------------------------------------------------------------ properties

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=32),
              st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["a", "b", "columns", "rows"]), inner, max_size=3),
        st.lists(st.fixed_dictionaries({"k": inner, "v": inner}), min_size=3, max_size=5)),
    max_leaves=20)


@PROPS
@given(json_values)
def test_table_encoding_round_trips_exactly(value):
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    table = T.tabulate_json(text)
    assert T.tabulate_json(table) == table
    if table == text:
        return  # nothing to tabulate, or a {"columns","rows"} object made it ambiguous
    restored = json.dumps(T.table_decode(json.loads(table)), ensure_ascii=False,
                          separators=(",", ":"))
    assert restored == text
