"""An in-memory corpus of Norwegian laws and provisions, searchable like Lovdata's.

The JSON format (see ``data/lovdata-fixture.json``) has two lists:

* ``laws``: ``doc_id`` (``NL/lov/2005-06-17-62``), ``law_id`` (``LOV-2005-06-17-62``),
  ``short_title``, ``title``, ``date``, ``type`` (``lov``/``forskrift``), ``url``,
  ``legal_area`` and optionally ``abbreviations`` (``["aml."]``) and ``amendments``.
* ``provisions``: ``provision_id`` (``<doc_id>/§15-7``), ``law_doc_id``, ``section``
  (``§ 15-7``), ``heading``, ``text``, ``url`` and ``cross_references`` (provision ids,
  which may point outside the corpus).

Operators can load their own file in the same shape; nothing here is specific to the
four laws of the fixture except the table of well-known abbreviations (``lawnames``).
Search is Norwegian full text ranked by BM25 (``search``).
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lovd.demo import lawnames, search

logger = logging.getLogger(__name__)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


LOVDATA_BASE = "https://lovdata.no"
_T = TypeVar("_T")

# Words too common to discriminate between provisions; dropped from queries so that a
# question-shaped query ("hva sier loven om oppsigelse") still finds the right text.
STOPWORDS: frozenset[str] = _words(
    """
    og i på om til av for med som er det den de en et å at har kan skal ikke eller fra
    ved etter når hva hvem hvor hvordan hvilke hvilken hvorfor sier står gjelder loven
    lov lovens jeg meg min mitt du deg vi oss seg sin sitt sine være blir bli hadde
    the a an of to in on for and or is are what which who how does do about law says
    """
)

_SECTION_RE = re.compile(
    r"(?:§+|\bparagraf(?:en)?\b)\s*(\d+\s*[a-zA-Z]?(?:\s*-\s*\d+\s*[a-zA-Z]?)?)", re.I
)


def tokenize(text: str) -> list[str]:
    return search.tokenize(text)


def query_terms(query: str) -> list[str]:
    """Query tokens without stopwords; falls back to all tokens if only stopwords remain."""
    tokens = tokenize(query)
    terms = [t for t in tokens if t not in STOPWORDS]
    return terms or tokens


def split_sections(query: str) -> tuple[set[str], str]:
    """The section numbers a query cites ("§ 15-7", "paragraf 9-6") and the rest of it."""
    sections = {normalize_section(m.group(1)) for m in _SECTION_RE.finditer(query)}
    return sections, _SECTION_RE.sub(" ", query)


def normalize_section(raw: str) -> str:
    """``"§ 15 - 7"``, ``"15-7"``, ``"§15-7"`` → ``"15-7"`` (lower-case letter suffixes)."""
    return re.sub(r"[\s§]+", "", raw).lower()


def lovdata_url_for(doc_or_provision_id: str) -> str:
    """The public lovdata.no URL of a document or provision id such as
    ``NL/lov/2005-06-17-62/§15-7`` → ``https://lovdata.no/lov/2005-06-17-62/§15-7``.

    Lovdata's short URLs drop the ``NL/``/``SF/``/``LTI/`` base prefix.
    """
    parts = doc_or_provision_id.split("/")
    if len(parts) >= 3 and parts[0].isupper():
        parts = parts[1:]
    return f"{LOVDATA_BASE}/{'/'.join(parts)}"


@dataclass(frozen=True)
class Law:
    doc_id: str
    law_id: str
    short_title: str
    title: str
    date: str
    type: str
    url: str
    legal_area: str
    abbreviations: tuple[str, ...] = ()
    amendments: tuple[Any, ...] = ()

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "doc_id": self.doc_id,
            "law_id": self.law_id,
            "title": self.title,
            "short_title": self.short_title,
            "date": self.date,
            "document_type": self.type,
            "legal_area": self.legal_area,
            "url": self.url,
        }
        if self.abbreviations:
            data["abbreviations"] = list(self.abbreviations)
        if self.amendments:
            data["amendments"] = list(self.amendments)
        return data


@dataclass(frozen=True)
class Provision:
    provision_id: str
    law_doc_id: str
    section: str
    heading: str
    text: str
    url: str
    cross_references: tuple[str, ...] = ()

    @property
    def number(self) -> str:
        return normalize_section(self.section)


@dataclass
class Corpus:
    path: Path
    laws: list[Law] = field(default_factory=list)
    provisions: list[Provision] = field(default_factory=list)
    stemmer: search.Stemmer = field(default_factory=search.Stemmer)
    _provision_index: search.Index | None = field(default=None, repr=False)
    _law_index: search.Index | None = field(default=None, repr=False)

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Corpus:
        raw = json.loads(path.read_text(encoding="utf-8"))
        corpus = cls(path=path)
        for item in raw.get("laws", []):
            doc_id = str(item["doc_id"])
            corpus.laws.append(
                Law(
                    doc_id=doc_id,
                    law_id=str(item.get("law_id") or ""),
                    short_title=str(item.get("short_title") or ""),
                    title=str(item.get("title") or item.get("short_title") or doc_id),
                    date=str(item.get("date") or ""),
                    type=str(item.get("type") or doc_id.split("/")[1]),
                    url=str(item.get("url") or lovdata_url_for(doc_id)),
                    legal_area=str(item.get("legal_area") or ""),
                    abbreviations=tuple(str(a) for a in item.get("abbreviations", [])),
                    amendments=tuple(item.get("amendments", [])),
                )
            )
        for item in raw.get("provisions", []):
            pid = str(item["provision_id"])
            corpus.provisions.append(
                Provision(
                    provision_id=pid,
                    law_doc_id=str(item["law_doc_id"]),
                    section=str(item.get("section") or ""),
                    heading=str(item.get("heading") or ""),
                    text=str(item.get("text") or ""),
                    url=str(item.get("url") or lovdata_url_for(pid)),
                    cross_references=tuple(str(c) for c in item.get("cross_references", [])),
                )
            )
        logger.info(
            "loaded corpus %s: %d laws, %d provisions",
            path,
            len(corpus.laws),
            len(corpus.provisions),
        )
        return corpus

    # --- lookups -------------------------------------------------------------------------

    def _law_keys(self, law: Law) -> set[str]:
        keys = {law.doc_id.lower(), law.law_id.lower(), law.short_title.lower()}
        keys.add(law.doc_id.split("/", 1)[-1].lower())  # "lov/2005-06-17-62"
        keys.add(law.doc_id.rsplit("/", 1)[-1].lower())  # "2005-06-17-62"
        keys.update(a.lower().rstrip(".") for a in law.abbreviations)
        keys.update(self._abbreviations(law))
        keys.add(lawnames.normalize_law_name(law.short_title))
        keys.discard("")
        return keys

    @staticmethod
    def _abbreviations(law: Law) -> set[str]:
        name = law.short_title.lower()
        return {abbr for abbr, title in lawnames.KNOWN_ABBREVIATIONS.items() if title == name}

    def find_law(self, ref: str) -> Law | None:
        """A law by doc id, LOV-id, date-number, short title (either written form:
        "husleielova"), title or abbreviation; a misspelt short title as a last resort."""
        key = ref.strip().lower().rstrip(".").strip()
        if not key:
            return None
        named = lawnames.normalize_law_name(key)
        for law in self.laws:
            keys = self._law_keys(law)
            if key in keys or named in keys or key == law.title.lower():
                return law
        # A URL or a longer phrase that names the law ("lov om husleieavtaler").
        for law in self.laws:
            if law.url.lower() in key or law.short_title.lower() in key:
                return law
        titles = {law.short_title.lower(): law for law in self.laws}
        close = lawnames.closest(named, list(titles))
        return titles[close] if close else None

    def unknown_law_name(self, ref: str) -> str | None:
        """The short title of a well-known law that ``ref`` names but this corpus does not
        hold ("avhl." → "avhendingslova"), so the answer can say which law is missing."""
        for token in [ref, *tokenize(ref)]:
            name = lawnames.expand_abbreviation(token)
            if name and self.find_law(name) is None:
                return name
        return None

    def law_of(self, provision: Provision) -> Law | None:
        return next((law for law in self.laws if law.doc_id == provision.law_doc_id), None)

    def provisions_of(self, law: Law) -> list[Provision]:
        return [p for p in self.provisions if p.law_doc_id == law.doc_id]

    def find_provision(self, ref: str) -> Provision | None:
        """A provision by its id (``NL/lov/2005-06-17-62/§15-7``), its URL, or a citation."""
        key = ref.strip()
        for p in self.provisions:
            if key in (p.provision_id, p.url):
                return p
        resolved = self.resolve(key)
        return resolved[1] if resolved else None

    def resolve(self, reference: str) -> tuple[Law, Provision | None, str | None] | None:
        """Parse a citation like ``"aml. § 15-7"``, ``"arbeidsmiljøloven §15-7"``,
        ``"LOV-2005-06-17-62-§15-7"`` or ``"Grunnloven"``.

        Returns (law, provision or None, requested section or None), or None when no law
        of the corpus is named.
        """
        text = reference.strip()
        match = _SECTION_RE.search(text)
        section = normalize_section(match.group(1)) if match else None
        law_part = (text[: match.start()] + " " + text[match.end() :]) if match else text
        law_part = law_part.replace("/", " / ").strip(" -,.")
        law = self.find_law(law_part) or self.find_law(law_part.replace(" / ", "/"))
        if law is None:
            for token in tokenize(law_part):
                if token in STOPWORDS:
                    continue
                law = self.find_law(token)
                if law:
                    break
        if law is None:
            return None
        if section is None:
            return law, None, None
        for p in self.provisions_of(law):
            if p.number == section:
                return law, p, section
        return law, None, section

    # --- search --------------------------------------------------------------------------

    def _law_names(self, law: Law | None) -> str:
        if law is None:
            return ""
        names = [law.short_title, law.title, *law.abbreviations, *self._abbreviations(law)]
        return " ".join(names)

    def provision_index(self) -> search.Index:
        if self._provision_index is None:
            # Heading words say what a provision is about; its law's names let a query
            # that names the law ("aml oppsigelse") keep to it.
            index = search.Index(self.stemmer, ["heading", "body", "law"], [4.0, 1.0, 1.0])
            for key, p in enumerate(self.provisions):
                index.add(key, [p.heading, p.text, self._law_names(self.law_of(p))])
            self._provision_index = index
        return self._provision_index

    def law_index(self) -> search.Index:
        if self._law_index is None:
            index = search.Index(self.stemmer, ["names", "area", "body"], [4.0, 2.0, 1.0])
            for key, law in enumerate(self.laws):
                body = " ".join(f"{p.heading} {p.text}" for p in self.provisions_of(law))
                index.add(key, [self._law_names(law), law.legal_area, body])
            self._law_index = index
        return self._law_index

    def search_provisions(
        self,
        query: str,
        law: Law | None,
        limit: int,
        *,
        require_all: bool,
        threshold: float = 0.0,
    ) -> tuple[list[tuple[Provision, float]], search.Result]:
        """Provisions for a query, best first, with what the search did.

        Full text (``require_all``): every word must match, else any word may (the
        result's mode says which); score is BM25. Otherwise ("semantic"): the share of
        query words matched, at least ``threshold``, ties broken by BM25. Section
        references in the query ("§ 15-7") keep the search to provisions with that
        number, and alone return them.
        """
        sections, rest = split_sections(query)
        within = {
            key
            for key, p in enumerate(self.provisions)
            if (law is None or p.law_doc_id == law.doc_id)
            and (not sections or p.number in sections)
        }
        terms = query_terms(rest) if rest.strip() else []
        result = self.provision_index().search(terms, require_all=require_all, within=within)
        if sections and not result.hits:
            # The cited section is the stronger signal than the words around it.
            hits = [search.Hit(k, 1.0, 0) for k in sorted(within)]
            result = search.Result(hits, result.terms, "section", result.corrected)
        return self._ranked(result, self.provisions, limit, require_all, threshold), result

    def search_laws(
        self, query: str, limit: int, *, require_all: bool, threshold: float = 0.0
    ) -> tuple[list[tuple[Law, float]], search.Result]:
        terms = query_terms(query)
        result = self.law_index().search(terms, require_all=require_all)
        return self._ranked(result, self.laws, limit, require_all, threshold), result

    @staticmethod
    def _ranked(
        result: search.Result, items: list[_T], limit: int, require_all: bool, threshold: float
    ) -> list[tuple[_T, float]]:
        if require_all:
            return [(items[h.key], h.score) for h in result.hits][: max(0, limit)]
        # Semantic: the share of query words found, ties broken by BM25.
        share = [
            (h, round(h.matched / result.terms, 3) if result.terms else 1.0) for h in result.hits
        ]
        kept = [(h, s) for h, s in share if s >= threshold]
        kept.sort(key=lambda hs: (-hs[1], -hs[0].score, hs[0].key))
        return [(items[h.key], s) for h, s in kept][: max(0, limit)]

    # --- rendering -----------------------------------------------------------------------

    def provision_record(self, p: Provision, *, full_text: bool = True) -> dict[str, Any]:
        law = self.law_of(p)
        data: dict[str, Any] = {
            "provision_id": p.provision_id,
            "law_doc_id": p.law_doc_id,
            "law_title": law.title if law else None,
            "law_short_title": law.short_title if law else None,
            "law_date": law.date if law else None,
            "section": p.section,
            "heading": p.heading,
            "url": p.url,
        }
        if full_text:
            data["text"] = p.text
        else:
            data["snippet"] = p.text if len(p.text) <= 300 else p.text[:297].rstrip() + "..."
        data["cross_references"] = list(p.cross_references)
        return data

    def law_html(self, law: Law) -> str:
        parts = [f"<h1>{html.escape(law.title)}</h1>", f"<p>{html.escape(law.date)}</p>"]
        for p in self.provisions_of(law):
            heading = f"{p.section}. {p.heading}" if p.heading else p.section
            paragraphs = "".join(
                f"<p>{html.escape(par)}</p>" for par in p.text.split("\n") if par.strip()
            )
            parts.append(
                f'<article class="legalArticle" id="{html.escape(p.provision_id)}">'
                f"<h2>{html.escape(heading)}</h2>{paragraphs}</article>"
            )
        return "\n".join(parts)

    def law_text(self, law: Law) -> str:
        lines = [law.title, law.date, ""]
        for p in self.provisions_of(law):
            lines.append(f"{p.section}. {p.heading}" if p.heading else p.section)
            lines.append(p.text)
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"
