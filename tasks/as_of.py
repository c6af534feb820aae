"""As-of dates: when a question is asked. Parsing the forms users and benchmarks write, and the mask
of memories already known then.

`parse_as_of` reads ISO 8601 dates and times ("2023-05-15", "2023-05-15T10:00:00Z"), LoCoMo's session
stamps ("1:56 pm on 8 May, 2023") and the "2023/05/30 (Tue) 23:40" form of other chat benchmarks. A
date without a time means the end of that day (everything said that day is known). Times without a
zone are UTC, as ingest reads them. Memories without an event time are always known.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import numpy as np

_SLASHED = re.compile(r"^(\d{4})/(\d{1,2})/(\d{1,2})(?:\s*\(\w+\))?(?:\s+(\d{1,2}):(\d{2}))?$")


def parse_as_of(value: Any) -> datetime | None:
    """A timezone-aware datetime, None for None/""; ValueError for anything unreadable."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return _end_of_day(value)
    if not isinstance(value, str):
        raise ValueError(f"an as-of date must be a string, got {type(value).__name__}")
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return _end_of_day(date.fromisoformat(text))
    if m := _SLASHED.match(text):
        y, mo, d, hh, mm = m.groups()
        if hh is None:
            return _end_of_day(date(int(y), int(mo), int(d)))
        return datetime(int(y), int(mo), int(d), int(hh), int(mm), tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            parsed = datetime.strptime(text, "%I:%M %p on %d %B, %Y")
        except ValueError:
            raise ValueError(
                f"cannot read the date {text[:60]!r}: use YYYY-MM-DD, an ISO 8601 time, "
                "'1:56 pm on 8 May, 2023' or '2023/05/30 (Tue) 23:40'"
            ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _end_of_day(day: date) -> datetime:
    return datetime.combine(day, time.max, tzinfo=UTC)


def as_of_day(as_of: datetime | None) -> date | None:
    """The calendar day (UTC) of an as-of time."""
    return None if as_of is None else as_of.astimezone(UTC).date()


def known_mask(event_times: Any, as_of: datetime | None) -> np.ndarray:
    """Per memory: whether it was known at `as_of` (event time at or before it, or no event time).
    `event_times` is an Arrow timestamp array or anything numpy reads as datetime64."""
    times = np.asarray(
        event_times.to_numpy(zero_copy_only=False) if hasattr(event_times, "to_numpy") else event_times
    )
    if as_of is None:
        return np.ones(len(times), dtype=bool)
    times = times.astype("datetime64[us]")
    limit = np.datetime64(as_of.astimezone(UTC).replace(tzinfo=None), "us")
    return np.isnat(times) | (times <= limit)


def days_before(as_of: datetime, days: int) -> date:
    return as_of_day(as_of) - timedelta(days=days)
