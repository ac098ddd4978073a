"""Norwegian full-text search for the Lovdata stand-in: Snowball stemming, BM25 ranking.

Documents are stemmed (Snowball's Norwegian stemmer, applied until the word stops
changing, so "arbeidsgiveren" and "arbeidsgiver" meet at "arbeidsgiv") and ranked with
BM25 over weighted fields (BM25F: a heading word counts more than a body word). The IDF is
Lucene's, log(1 + (N - n + 0.5) / (n + 0.5)), which stays positive: in a corpus of twenty
provisions a word most of them hold ("oppsigelse") must still rank, where SQLite FTS5's
Robertson IDF would clamp it to zero.

A query word is matched as a stem prefix (Norwegian compounds grow at the end: "oppsig"
finds "oppsigelsesvern"); a compound the corpus does not hold falls back to its longest
leading part the corpus does hold ("oppsigelsestid" → "oppsigelsesfrist"'s "oppsig..."),
and a word that matches nothing to the closest word that does (a typo).
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import snowballstemmer

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_MIN_PREFIX = 3  # shorter stems match only themselves ("si" must not find "sikre")
_MIN_COMPOUND_HEAD = 4
_TYPO_CUTOFF = 0.8


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


class Stemmer:
    """Snowball's Norwegian stemmer, to a fixed point."""

    def __init__(self) -> None:
        self._snowball = snowballstemmer.stemmer("norwegian")
        self._cache: dict[str, str] = {}

    def stem(self, word: str) -> str:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        stem = word
        for _ in range(3):
            shorter = str(self._snowball.stemWord(stem))
            if shorter == stem or len(shorter) < 2:
                break
            stem = shorter
        self._cache[word] = stem
        return stem

    def stems(self, text: str) -> list[str]:
        return [self.stem(t) for t in tokenize(text)]


@dataclass(frozen=True)
class Hit:
    key: int
    score: float  # BM25, higher is better
    matched: int  # how many of the query's terms this document matched


@dataclass(frozen=True)
class Result:
    hits: list[Hit]
    terms: int  # query terms searched for
    mode: str  # "all" (every term matched) or "any" (the fallback)
    corrected: dict[str, str]  # query stem -> the corpus word searched instead


class Index:
    """BM25F over documents with named, weighted text fields."""

    K1 = 1.2
    B = 0.75

    def __init__(self, stemmer: Stemmer, columns: Sequence[str], weights: Sequence[float]) -> None:
        if len(columns) != len(weights):
            raise ValueError("one weight per column")
        self.stemmer = stemmer
        self.columns = list(columns)
        self.weights = list(weights)
        self.vocabulary: set[str] = set()
        self._docs: dict[int, list[Counter[str]]] = {}
        self._lengths: dict[int, list[int]] = {}

    def add(self, key: int, fields: Sequence[str]) -> None:
        if len(fields) != len(self.columns):
            raise ValueError("one text per column")
        stemmed = [self.stemmer.stems(f) for f in fields]
        for words in stemmed:
            self.vocabulary.update(words)
        self._docs[key] = [Counter(words) for words in stemmed]
        self._lengths[key] = [len(words) for words in stemmed]

    # --- query terms ---------------------------------------------------------------------

    def _words_for(self, stem: str) -> tuple[frozenset[str], str | None]:
        """(the corpus words one query stem matches, the corpus word searched for instead
        when the stem itself is in none)."""
        if len(stem) < _MIN_PREFIX:
            return (frozenset({stem}) if stem in self.vocabulary else frozenset()), None
        prefixed = frozenset(w for w in self.vocabulary if w.startswith(stem))
        if prefixed:
            return prefixed, None
        heads = [w for w in self.vocabulary if len(w) >= _MIN_COMPOUND_HEAD and stem.startswith(w)]
        if heads:
            head = max(heads, key=len)
            return frozenset(w for w in self.vocabulary if w.startswith(head)), head
        if len(stem) >= 4:
            close = difflib.get_close_matches(stem, self.vocabulary, n=1, cutoff=_TYPO_CUTOFF)
            if close:
                return frozenset({close[0]}), close[0]
        return frozenset(), None

    def terms(self, words: Sequence[str]) -> list[str]:
        """The distinct stems of query words, in order."""
        return list(dict.fromkeys(self.stemmer.stem(w.lower()) for w in words if w.strip()))

    # --- scoring -------------------------------------------------------------------------

    def _bm25(self, key: int, words: frozenset[str], idf: float, average: list[float]) -> float:
        # BM25F: weighted, length-normalised term frequencies summed over the fields,
        # then saturated once.
        tf = 0.0
        for field, counts in enumerate(self._docs[key]):
            n = sum(counts[w] for w in words)
            if n:
                norm = 1 - self.B + self.B * self._lengths[key][field] / (average[field] or 1)
                tf += self.weights[field] * n / norm
        return idf * tf * (self.K1 + 1) / (tf + self.K1)

    def search(
        self, words: Sequence[str], *, require_all: bool, within: set[int] | None = None
    ) -> Result:
        """Documents matching every query word, or when none does (or ``require_all`` is
        false) any of them, best BM25 first; ``within`` limits the documents searched."""
        terms = self.terms(words)
        corrected: dict[str, str] = {}
        groups: list[frozenset[str]] = []
        for stem in terms:
            found, instead = self._words_for(stem)
            groups.append(found)
            if instead is not None and instead != stem:
                corrected[stem] = instead
        keys = [k for k in self._docs if within is None or k in within]
        total = len(self._docs)
        average = [
            sum(self._lengths[k][f] for k in self._docs) / max(1, total)
            for f in range(len(self.columns))
        ]
        scores: dict[int, float] = {}
        matched: dict[int, int] = {}
        for group in groups:
            if not group:
                continue
            holders = {
                k for k, fields in self._docs.items() if any(c[w] for c in fields for w in group)
            }
            idf = math.log(1 + (total - len(holders) + 0.5) / (len(holders) + 0.5))
            for key in keys:
                if key in holders:
                    scores[key] = scores.get(key, 0.0) + self._bm25(key, group, idf, average)
                    matched[key] = matched.get(key, 0) + 1
        mode = "any"
        chosen = list(matched)
        if require_all:
            every = [k for k in chosen if matched[k] == len(terms)]
            if every:
                chosen, mode = every, "all"
        hits = [Hit(k, round(scores[k], 3), matched[k]) for k in chosen]
        hits.sort(key=lambda h: (-h.score, h.key))
        return Result(hits, len(terms), mode, corrected)
