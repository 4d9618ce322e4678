"""Pure rendering of a reader study's answers as CSV, one row per answer.

Choice answers hold option ids (gc-api.md §3.10); a reviewer wants the option titles, so ids
are turned into titles through the study's questions, several choices joined with "; " in one
cell. Other answer types (bool, number, text, annotations) are written as JSON, so a cell can
be parsed back with `json.loads`. The file is UTF-8 with a header row and `\\r\\n` line ends
(the csv module's default, what spreadsheets expect), and opens with `pandas.read_csv`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .names import is_uuid

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
    parts = [p for p in urlsplit(url).path.split("/") if p]
    return parts[-1] if parts and is_uuid(parts[-1]) else ""


def _cell(answer: object, question: Mapping[str, Any] | None) -> str:
    if question is not None and question.get("answer_type") in CHOICE_TYPES:
        titles = {
            option.get("id"): option.get("title")
            for option in question.get("options") or []
            if isinstance(option, Mapping)
        }
        ids = answer if isinstance(answer, list) else [answer]
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return "; ".join(str(titles.get(i, i)) for i in ids)
    if isinstance(answer, str):
        return answer
    return json.dumps(answer, ensure_ascii=False)


def render_answers_csv(
    answers: Sequence[Mapping[str, Any]],
    questions: Sequence[Mapping[str, Any]],
    display_sets: Sequence[Mapping[str, Any]],
) -> bytes:
    questions_by_pk = {q.get("pk"): q for q in questions if isinstance(q, Mapping)}
    titles = {
        d.get("pk"): d.get("title_safe", d.get("title", ""))
        for d in display_sets
        if isinstance(d, Mapping)
    }
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for answer in answers:
        question_pk = pk_in_url(answer.get("question"))
        question = questions_by_pk.get(question_pk)
        display_set_pk = pk_in_url(answer.get("display_set"))
        writer.writerow(
            [
                answer.get("pk", ""),
                display_set_pk,
                titles.get(display_set_pk, "") or "",
                question_pk,
                (question or {}).get("question_text", ""),
                (question or {}).get("answer_type", ""),
                answer.get("creator", ""),
                answer.get("created", ""),
                answer.get("modified", ""),
                answer.get("is_ground_truth", ""),
                _cell(answer.get("answer"), question),
                pk_in_url(answer.get("answer_image")),
            ]
        )
    return out.getvalue().encode("utf-8")
