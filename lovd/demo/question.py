"""How the stub model reads a question: which law it names, which sections it cites, and
the words worth searching for.

What a real model knows and a search engine does not lives here: that "sparken" and
"si opp" mean oppsigelse, that a "huseier" is an utleier, that "hl" is husleieloven. The
search itself (the Lovdata stand-in) stays an honest full-text search.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lovd.demo import lawnames

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_SECTION_RE = re.compile(
    r"(?:§+|\bparagraf(?:en)?\b)\s*(\d+\s*[a-zA-Z]?(?:\s*-\s*\d+)?)(?![\w-])", re.I
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that shape a question but say nothing about its subject (Norwegian and English).
STOPWORDS: frozenset[str] = _words(
    """
    hva hvem hvor hvordan hvilke hvilken hvilket hvorfor når sier står gjelder om og i på
    til av for med som er det den de en et ei å at har hadde kan kunne skal skulle må
    måtte ikke eller fra ved etter jeg meg min mitt mine du deg din ditt vi oss vår våre
    dere han ham hun henne hans hennes sin sitt sine seg de dem deres norsk norske norge
    loven lov lovens lova regler reglene regel egentlig noe noen mye mange lenge lang
    lange langt bare også hvis dersom da så nå der her dette denne disse få får fikk
    gjøre gjør gjort vil ville bør burde blir bli ble vært være er var nok sånn slik
    eller ifølge iht jf mot uten meste mest mer hele helt går gå gikk kommer stå står
    noen ting tilfelle fordi enn allerede ennå fortsatt altså vel jo liksom gi gis gir
    god gode skjer skje skjedde ut inn opp stor stort store liten lite fått
    the a an of to in on for and or is are what which who how does do about say says
    under according rules norway norwegian me my i can law laws legal
    """
)

# Everyday words and phrases -> the words the law uses (a model's paraphrase).
PHRASES: tuple[tuple[str, str], ...] = (
    (r"\b(?:si|sier|sa|sagt|sies|bli sagt|blitt sagt)\s+(?:\w+\s+)?opp\b", " oppsigelse "),
    (r"\bkaste[rt]?\s+(?:\w+\s+)?ut\b", " oppsigelse "),
    (r"\bikke\s+(?:har\s+)?betal(?:er|t|e)\b", " mislighold "),
    (r"\bbo\s+(?:der|i\s+\w+)\s+selv\b", " bolig selv "),
    (r"\b(?:god|gyldig|skikkelig|ordentlig)\s+grunn\b", " saklig "),
    (r"\bbor\s+videre\b", " fortsetter leieforholdet "),
    (r"\bg(?:å|år|ikk)\s+ut\b", " utløpet "),
)
EVERYDAY: dict[str, str] = {
    "sparken": "oppsigelse",
    "oppsagt": "oppsigelse",
    "oppsigelsen": "oppsigelse",
    "sjef": "arbeidsgiver",
    "sjefen": "arbeidsgiver",
    "jobben": "arbeid",
    "jobb": "arbeid",
    "ansatt": "arbeidstaker",
    "ansatte": "arbeidstaker",
    "huseier": "utleier",
    "huseieren": "utleier",
    "huseiere": "utleier",
    "huseierne": "utleier",
    "utleiere": "utleier",
    "leietaker": "leier",
    "leietakeren": "leier",
    "leietakere": "leier",
    "hybel": "beboelsesrom",
    "hybelen": "beboelsesrom",
    "leiekontrakt": "leieavtale",
    "leiekontrakten": "leieavtale",
    "husleiekontrakt": "leieavtale",
    "husleiekontrakten": "leieavtale",
    "kontrakten": "avtale",
    "kontrakt": "avtale",
    "husleie": "leie",
    "husleia": "leie",
    "husleien": "leie",
    "syk": "sykdom",
    "sykmeldt": "sykdom",
    "sykemeldt": "sykdom",
    "sykemelding": "sykdom",
    "sykmelding": "sykdom",
    "nedbemanning": "driftsinnskrenkning",
    "nedbemanninger": "driftsinnskrenkning",
    "nedskjæringer": "driftsinnskrenkning",
    "diskriminering": "forskjellsbehandling",
    "diskriminert": "forskjellsbehandling",
    "diskriminere": "forskjellsbehandling",
    "ransake": "husransakelse",
    "ransaking": "husransakelse",
    "ransakelse": "husransakelse",
    "urettferdig": "usaklig",
    "urimelig": "usaklig",
    "prøveperiode": "prøvetid",
    "prøveperioden": "prøvetid",
    "oppsigelsestid": "oppsigelsesfrist",
    "oppsigelsestiden": "oppsigelsesfrist",
    "muntlig": "formkrav skriftlig",
    "leiligheten": "leieavtale",
    "leilighet": "leieavtale",
    "leieforholdet": "leieavtale",
    "klage": "protestere",
    "saksøke": "søksmål",
    "saksøker": "søksmål",
    "klager": "protestere",
    "avskjediget": "avskjed",
    "avskjedige": "avskjed",
    "personvernet": "personopplysninger",
    "personvern": "personopplysninger",
    "monarki": "monarkisk",
    "konge": "monarkisk",
    "kongen": "monarkisk",
    "familien": "familiemessige",
    "privat": "personlige",
}


@dataclass(frozen=True)
class Question:
    text: str
    law: str | None  # the law named, as the search should be told it ("husleieloven")
    law_name: str | None  # its short title when the stub knows it (for "not found")
    sections: tuple[str, ...]  # cited sections, "15-7"
    words: tuple[str, ...]  # what to search for

    @property
    def query(self) -> str:
        return " ".join(self.words)


def _law_in(words: list[str]) -> tuple[str | None, str | None, str | None]:
    """(the word naming a law, the law to search, its short title)."""
    known = sorted(set(lawnames.KNOWN_ABBREVIATIONS.values()) | {"grunnloven"})
    for word in words:
        title = lawnames.expand_abbreviation(word)
        if title:
            return word, title, title
        if lawnames.looks_like_law_name(word) and word not in STOPWORDS:
            name = lawnames.normalize_law_name(word)
            # "husleielova" and "husleieloven" are the same law; keep the title known.
            title = next((k for k in known if lawnames.normalize_law_name(k) == name), None)
            return word, name, title or word
    for word in words:
        close = lawnames.closest(word, known)
        if close:
            return word, close, close
    return None, None, None


def read(text: str) -> Question:
    """What a question asks, in search terms.

    "Kan arbeidsgiveren si meg opp uten saklig grunn?" → words ("arbeidsgiveren",
    "oppsigelse", "saklig", "grunn"), no law.
    """
    sections = tuple(re.sub(r"\s+", "", m.group(1)).lower() for m in _SECTION_RE.finditer(text))
    rest = _SECTION_RE.sub(" ", text).lower()
    for pattern, replacement in PHRASES:
        rest = re.sub(pattern, replacement, rest)
    tokens = _WORD_RE.findall(rest)
    named, law, title = _law_in(tokens)
    words: list[str] = []
    for token in tokens:
        if token == named or token in STOPWORDS or len(token) < 2 or token.isdigit():
            continue
        for word in EVERYDAY.get(token, token).split():
            if word not in words:
                words.append(word)
    return Question(text=text, law=law, law_name=title, sections=sections, words=tuple(words))
