"""Pure rendering of a reader study's answers as CSV, one row per answer.

The `answer` column has one rule: every cell is JSON, parsed back with `json.loads` whatever
the question's type, so a Text answer `"true"` (the cell `"true"`, quotes included) is never
taken for a Bool `true`, and a loader needs no other column to read it. Choice answers hold
option ids (gc-api.md §3.10); a reviewer wants the option titles, so ids are turned into
titles through the study's questions: a JSON string for one choice, a JSON list for several
(an id with no option keeps its number). The file is UTF-8 with a header row and `\\r\\n` line ends
(the csv module's default, what spreadsheets expect), and opens with `pandas.read_csv`.

Malformed input (gc-api.md §9, "read tolerantly"): any JSON shape is accepted and nothing but
`BadResponse` is raised, and that only when `answers`, `questions` or `display_sets` is not a
list at all. An entry of those lists that is not an object is skipped (logged): an answer that
is not an object gets no row, every object answer gets exactly one. A field of the wrong type
never fails a row: a pk or URL that is not a string reads as unknown (empty cell), an option
id that is not an integer is ignored, a plain field holding a list or object is written as
JSON, and a string UTF-8 cannot encode (a lone surrogate from a `\\udxxx` escape) has that
character replaced by U+FFFD.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .errors import BadResponse
from .names import is_uuid

log = logging.getLogger(__name__)

COLUMNS = (
    "answer_pk",
    "display_set_pk",
    "display_set_title",
    "question_pk",
    "question_text",
    "answer_type",
    "creator",
    "created",
    "modified",
    "is_ground_truth",
    "answer",
    "answer_image_pk",
)
CHOICE_TYPES = frozenset({"Choice", "Multiple choice", "Multiple Choice"})


def pk_in_url(url: object) -> str:
    """The trailing pk of an API URL, or "" for null and anything else."""
    if not isinstance(url, str):
        return ""
    try:
        path = urlsplit(url).path
    except ValueError:  # `http://[`: not a URL
        return ""
    parts = [p for p in path.split("/") if p]
    return parts[-1] if parts and is_uuid(parts[-1]) else ""


def _text(value: object) -> str:
    """A cell for a plain field: strings as they are, null empty, numbers and booleans as
    Python writes them (`12.5`, `True`), lists and objects as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return str(value)
    return _json(value)


def _json(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        log.warning("answers.csv: a cell is not JSON; leaving it empty")
        return ""


def _options(question: Mapping[str, Any]) -> dict[int, str]:
    options = question.get("options")
    titles: dict[int, str] = {}
    for option in options if isinstance(options, list) else []:
        if isinstance(option, Mapping):
            option_id = option.get("id")
            if isinstance(option_id, int) and not isinstance(option_id, bool):
                titles[option_id] = _text(option.get("title"))
    return titles


def _cell(answer: object, question: Mapping[str, Any] | None) -> str:
    """The `answer` cell: always JSON (module docstring), choice ids as option titles."""
    answer_type = question.get("answer_type") if question is not None else None
    if question is not None and isinstance(answer_type, str) and answer_type in CHOICE_TYPES:
        titles = _options(question)
        items: list[object] = answer if isinstance(answer, list) else [answer]
        ids = [i for i in items if isinstance(i, int) and not isinstance(i, bool)]
        if len(ids) == len(items):
            named: list[object] = [titles.get(i, i) for i in ids]
            return _json(named if isinstance(answer, list) else named[0])
    return _json(answer)


def _objects(what: str, objects: object) -> list[Mapping[str, Any]]:
    if not isinstance(objects, list | tuple):
        raise BadResponse(f"answers.csv: {what} is not a JSON list")
    found = [o for o in objects if isinstance(o, Mapping)]
    if len(found) < len(objects):
        log.warning(
            "answers.csv: skipping %d %s that are not objects", len(objects) - len(found), what
        )
    return found


def _by_pk(objects: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    by_pk: dict[str, Mapping[str, Any]] = {}
    for obj in objects:
        pk = obj.get("pk")
        if isinstance(pk, str):
            by_pk.setdefault(pk, obj)
    return by_pk


def _utf8(text: str) -> bytes:
    # A lone surrogate (JSON's `"\ud800"`) has no UTF-8 form: it becomes U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def render_answers_csv(
    answers: Sequence[object],
    questions: Sequence[object],
    display_sets: Sequence[object],
) -> bytes:
    """answers.csv for these answers; raises BadResponse only if an argument is not a list."""
    questions_by_pk = _by_pk(_objects("questions", questions))
    display_sets_by_pk = _by_pk(_objects("display sets", display_sets))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for answer in _objects("answers", answers):
        question_pk = pk_in_url(answer.get("question"))
        question = questions_by_pk.get(question_pk)
        display_set_pk = pk_in_url(answer.get("display_set"))
        display_set = display_sets_by_pk.get(display_set_pk) or {}
        title = display_set.get("title_safe", display_set.get("title"))
        writer.writerow(
            [
                _text(answer.get("pk")),
                display_set_pk,
                _text(title),
                question_pk,
                _text((question or {}).get("question_text")),
                _text((question or {}).get("answer_type")),
                _text(answer.get("creator")),
                _text(answer.get("created")),
                _text(answer.get("modified")),
                _text(answer.get("is_ground_truth")),
                _cell(answer.get("answer"), question),
                pk_in_url(answer.get("answer_image")),
            ]
        )
    return _utf8(out.getvalue())
