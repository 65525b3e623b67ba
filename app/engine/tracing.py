"""Response episodes found in one pass over the evaluated occasions, in clinical order.

The rules (docs/response-rules.md) are searches: the first count that a later one confirms,
the first loss after a response, the CR stretches inside an episode. Each is written here as
a fold: a small state that takes one occasion at a time and, after every occasion, says
what the search over everything seen so far would say. So the occasions are walked once,
never searched back and forth, and an `EpisodeTracer` can be kept and given a later
occasion without walking the history again (issue 20, part 4).

Two facts make a fold exact where a search would look ahead:
- A confirmation is found at its second occasion, paired with the earliest endpoint since
  the last occasion that breaks the chain: positions only grow in clinical order, so that
  endpoint is the furthest from it, and if any earlier endpoint is confirmed, it is.
- A loss in a run of occasions that do not hold the level is the run's first occasion with
  the first later one far enough from it, or else the run's first bleeding occasion. While
  the run is open, such a bleeding occasion is the loss so far; a later occasion far enough
  from the run's first can still replace it, and an occasion that holds the level makes it
  final. Searches that begin after a loss which can still move are begun again when it
  moves; until then they have seen only occasions that do not hold the level, which leave
  them as they began.
`tests/engine/test_tracing.py` holds the fold against the search-based tracer it replaced,
after every occasion of dense drawn sequences; `tests/engine/test_equivalence.py` holds the
whole engine against the reference engine.
"""

from __future__ import annotations

from collections import deque
from datetime import date, datetime
from typing import Final, NamedTuple


class Occasion(NamedTuple):
    """An evaluated occasion after the start: a count that is neither under rescue nor on a
    day that is not evaluable, or a bleed on a day without a count (`is_count` False).

    `position` is where the occasion sits on the confirm clock (a day number, or
    microseconds), so both clocks compare distances with one subtraction.
    A tuple, not a frozen dataclass: a patient with 1,000 counts makes 1,000 of them per
    recompute, and a tuple is built several times faster (measured in bench/README.md)."""

    id: str
    time: datetime
    day: date
    position: int
    bleeding: bool
    r_qualifying: bool
    cr_qualifying: bool
    # "count", or for a bleeding occasion the evidence key of its bleed
    source: str = "count"

    @property
    def is_count(self) -> bool:
        return self.source == "count"

    @property
    def qualifying(self) -> bool:
        """Not failing: a CR-qualifying count that misses the doubling rule still counts (spec)."""
        return self.r_qualifying or self.cr_qualifying


class Pair(NamedTuple):
    """A decision's two occasions, with their places in the order the tracer saw them (both
    the same occasion for a loss by a single bleeding one). Pairs compare by those places:
    the earlier first occasion, then the earlier second."""

    first_at: int
    second_at: int
    first: Occasion
    second: Occasion


class Seen(NamedTuple):
    at: int
    occasion: Occasion


# Field numbers of an Occasion, read in the fold's hot path (an index is cheaper than a
# name or a property on every occasion of a 1,000-count history).
_R: Final = 5
_CR: Final = 6
_SOURCE: Final = 7


def _holds(occasion: Occasion, cr_level: bool) -> bool:
    """Whether the occasion holds CR (`cr_level`), or else a response (is not failing)."""
    return occasion[_CR] if cr_level else occasion[_R] or occasion[_CR]


class Confirming:
    """The first occasion A that a later one B confirms, B at least `gap` after A, with no
    occasion between them breaking the chain (`found`), over the occasions given so far.

    The R rule (`cr_level` False): both reach R, and none between is failing. The CR rule:
    both reach CR, and none between is below it."""

    __slots__ = ("alive", "cr_level", "found", "gap")

    def __init__(self, cr_level: bool, gap: int) -> None:
        self.cr_level, self.gap = cr_level, gap
        self.alive: Seen | None = None  # the earliest endpoint since the last break
        self.found: Pair | None = None

    def push(self, at: int, occasion: Occasion) -> None:
        # Never given an occasion once `found`: its owner stops searching then.
        if not _holds(occasion, self.cr_level):
            self.alive = None
        elif occasion[_CR] if self.cr_level else occasion[_R]:
            alive = self.alive
            if alive is None:
                self.alive = Seen(at, occasion)
            elif occasion.position - alive.occasion.position >= self.gap:
                self.found = Pair(alive.at, at, alive.occasion, occasion)


class Losing:
    """The first loss of a level (CR when `cr_level`, else a response) over the occasions
    given so far (`result`).

    Either one bleeding occasion, or an occasion that does not hold the level confirmed by
    a later one at least `gap` after it with none holding the level in between; the loss
    date is the first occasion of the pair, so the earliest such first occasion wins.
    `found` is a loss no later occasion can change; `bleed`, the first bleeding occasion of
    the open run (not its first occasion), is the loss until then.
    """

    __slots__ = ("bleed", "cr_level", "found", "gap", "run")

    def __init__(self, cr_level: bool, gap: int) -> None:
        self.cr_level, self.gap = cr_level, gap
        self.run: Seen | None = None  # the first occasion since the last one holding
        self.bleed: Seen | None = None
        self.found: Pair | None = None

    @property
    def result(self) -> Pair | None:
        if self.found is not None or self.bleed is None:
            return self.found
        return Pair(self.bleed.at, self.bleed.at, self.bleed.occasion, self.bleed.occasion)

    def push(self, at: int, occasion: Occasion) -> bool:
        """Take the next occasion; whether `result` moved (appeared or changed)."""
        if self.found is not None:
            return False
        if _holds(occasion, self.cr_level):
            if self.run is not None:
                # The run ends: its bleed, if any, can no longer be replaced (same result).
                self.found = self.result
                self.run = self.bleed = None
            return False
        run = self.run
        if run is None:
            self.run = Seen(at, occasion)
            if occasion.bleeding:
                self.found = Pair(at, at, occasion, occasion)
                return True
            return False
        if occasion.position - run.occasion.position >= self.gap:
            self.found = Pair(run.at, at, run.occasion, occasion)
            return True
        if occasion.bleeding and self.bleed is None:
            self.bleed = Seen(at, occasion)
            return True
        return False


class CrStretch:
    """A stretch of complete response: the pair that confirmed it, and its loss so far."""

    __slots__ = ("confirmed", "lost")

    def __init__(self, confirmed: Pair, lost: Losing) -> None:
        self.confirmed, self.lost = confirmed, lost


class EpisodeTrace:
    """One episode: the pair that confirmed the response, its loss so far (`loss.result`),
    and its CR stretches. The CR stretches are searched only before the episode's loss; a
    CR stretch's loss is searched without that bound (a loss of response is always also a
    loss of CR, so it is found at or before the episode's loss, and can move with it)."""

    __slots__ = ("cr_search", "gap", "loss", "onset", "stretches")

    def __init__(self, onset: Pair, gap: int, loss_gap: int) -> None:
        self.onset, self.gap = onset, gap
        self.loss = Losing(False, loss_gap)
        self.stretches: list[CrStretch] = []
        self.cr_search: Confirming | None = Confirming(True, gap)

    @property
    def lost(self) -> bool:
        """Whether the response is lost, for now or for good."""
        return self.loss.found is not None or self.loss.bleed is not None

    def push(self, at: int, occasion: Occasion) -> bool:
        """Take the next occasion; whether the episode's loss moved (appeared or changed)."""
        moved = self.loss.push(at, occasion)
        stretches = self.stretches
        cr_lost_moved = stretches[-1].lost.push(at, occasion) if stretches else False
        if self.lost:
            self.cr_search = None  # no CR stretch starts at or after the loss
            return moved
        if cr_lost_moved:
            # CR lost (or its loss moved): the next stretch is searched after the loss.
            self.cr_search = Confirming(True, self.gap)
        elif self.cr_search is not None:
            self.cr_search.push(at, occasion)
            if self.cr_search.found is not None:
                lost = Losing(True, self.loss.gap)  # searched after the stretch's pair
                stretches.append(CrStretch(self.cr_search.found, lost))
                self.cr_search = None
        return False


class OnsetSearch:
    """The next response: the earlier of the first R pair and the first CR pair (a CR pair
    alone when its counts miss the doubling rule), and the occasions since the earliest
    endpoint either search still holds, which the episode it starts is given again."""

    __slots__ = ("cr", "r", "recent")

    def __init__(self, gap: int) -> None:
        self.r = Confirming(False, gap)
        self.cr = Confirming(True, gap)
        self.recent: deque[Seen] = deque()

    def push(self, at: int, occasion: Occasion) -> Pair | None:
        self.r.push(at, occasion)
        self.cr.push(at, occasion)
        self.recent.append(Seen(at, occasion))
        found = [pair for pair in (self.r.found, self.cr.found) if pair is not None]
        if found:
            return min(found)
        alive = [seen.at for seen in (self.r.alive, self.cr.alive) if seen is not None]
        if not alive:
            self.recent.clear()
            return None
        earliest = min(alive)
        while self.recent[0].at < earliest:
            self.recent.popleft()
        return None


class EpisodeTracer:
    """The episodes of a sequence of occasions given one at a time, in clinical order.

    After each `push`, `episodes` and the occasions kept here are what searching the whole
    sequence so far would give: a response, its CR stretches, its loss; then the next
    response after that loss.
    """

    def __init__(self, gap: int, loss_gap: int) -> None:
        self.gap, self.loss_gap = gap, loss_gap
        self.episodes: list[EpisodeTrace] = []
        self.latest: Occasion | None = None
        self.latest_count: Occasion | None = None
        self.bleeding: list[Occasion] = []  # every bleeding occasion, in order
        self.seen = 0
        self.onset_search: OnsetSearch | None = OnsetSearch(gap)
        # CR losses of episodes before the current one that can still move.
        self.trailing: list[Losing] = []

    def push(self, occasion: Occasion) -> None:
        at = self.seen
        self.seen += 1
        self.latest = occasion
        if occasion[_SOURCE] == "count":
            self.latest_count = occasion
        if occasion.bleeding:
            self.bleeding.append(occasion)
        if self.trailing:
            for lost in self.trailing:
                lost.push(at, occasion)
            self.trailing = [lost for lost in self.trailing if lost.found is None]
        current = self.episodes[-1] if self.episodes else None
        if current is not None:
            moved = current.push(at, occasion)
            if not current.lost:
                return
            if moved:  # the next response is searched after the loss, from the next occasion
                self.onset_search = OnsetSearch(self.gap)
                return
        assert self.onset_search is not None
        onset = self.onset_search.push(at, occasion)
        if onset is not None:
            self._start_episode(onset, current)

    def _start_episode(self, onset: Pair, previous: EpisodeTrace | None) -> None:
        assert self.onset_search is not None
        episode = EpisodeTrace(onset, self.gap, self.loss_gap)
        # The episode's own searches begin at the response's first occasion.
        for seen in self.onset_search.recent:
            if seen.at >= onset.first_at:
                episode.push(seen.at, seen.occasion)
        if previous is not None:
            self.trailing += [
                stretch.lost for stretch in previous.stretches if stretch.lost.found is None
            ]
        self.episodes.append(episode)
        self.onset_search = None
