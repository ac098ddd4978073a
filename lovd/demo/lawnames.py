"""The names people use for Norwegian laws: Lovdata's customary abbreviations
("forkortelser"), everyday short forms and the nynorsk/bokmål endings.

Shared by the Lovdata stand-in (which laws a reference names) and the stub model (which
law a question names, and what to call it when the corpus does not hold it). The table
names laws a corpus may well not hold, so that "avhl" is answered as "avhendingslova is
not in this selection" and not as an unknown word.
"""

from __future__ import annotations

import difflib
import re

# abbreviation (lower case, without the trailing dot) -> the law's short title.
KNOWN_ABBREVIATIONS: dict[str, str] = {
    "aml": "arbeidsmiljøloven",
    "hl": "husleieloven",
    "husl": "husleieloven",
    "husll": "husleieloven",
    "hrl": "husleieloven",
    "grl": "grunnloven",
    "popplyl": "personopplysningsloven",
    "pol": "personopplysningsloven",
    "avtl": "avtaleloven",
    "avhl": "avhendingslova",
    "fvl": "forvaltningsloven",
    "strl": "straffeloven",
    "strpl": "straffeprosessloven",
    "tvl": "tvisteloven",
    "tvfbl": "tvangsfullbyrdelsesloven",
    "kjl": "kjøpsloven",
    "fkjl": "forbrukerkjøpsloven",
    "hvtjl": "håndverkertjenesteloven",
    "buofl": "bustadoppføringslova",
    "pbl": "plan- og bygningsloven",
    "ftrl": "folketrygdloven",
    "offl": "offentleglova",
    "arvel": "arveloven",
    "sktl": "skatteloven",
    "vtrl": "vegtrafikkloven",
    "esl": "eierseksjonsloven",
    "skl": "skadeserstatningsloven",
    "ldl": "likestillings- og diskrimineringsloven",
    "ferieloven": "ferieloven",
}

_LAW_WORD_RE = re.compile(r"^\w{3,}(?:loven|lova|lov|lovens|lovas)$")


def normalize_law_name(word: str) -> str:
    """One spelling per law name: lower case, no trailing dot, bokmål's definite form
    ("husleielova", "husleielov", "husleielovens" → "husleieloven")."""
    key = word.strip().lower().rstrip(".").strip()
    key = re.sub(r"lov(?:a|ens|as)$", "loven", key)
    return key + "en" if key.endswith("lov") and len(key) > 3 else key


def expand_abbreviation(word: str) -> str | None:
    """The short title an abbreviation stands for ("aml." → "arbeidsmiljøloven")."""
    return KNOWN_ABBREVIATIONS.get(word.strip().lower().rstrip("."))


def looks_like_law_name(word: str) -> bool:
    """A word shaped like a law's short title ("husleieloven", "avhendingslova")."""
    return bool(_LAW_WORD_RE.match(word.lower()))


def closest(word: str, names: list[str], cutoff: float = 0.85) -> str | None:
    """The name a misspelt law name most likely means ("arbeidsmiljøloen")."""
    if len(word) < 8:
        return None
    found = difflib.get_close_matches(word, names, n=1, cutoff=cutoff)
    return found[0] if found else None
