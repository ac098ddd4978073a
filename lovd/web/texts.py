# ruff: noqa: RUF001 - Norwegian typography writes the dash as an en dash (tankestrek).
"""Every text a person reads on lovd's own pages, in every language lovd speaks.

Norwegian bokmål first (the service is for people with questions about Norwegian law),
English when the browser prefers it (``Accept-Language``). To add a language: add its
table to ``TEXTS`` with every key of ``nb`` (tests/unit/test_pages_i18n.py checks), and
the language tags that should pick it to ``TAGS``.

Texts are ``str.format`` templates; the caller HTML-escapes them (pages.py).
"""

from __future__ import annotations

import math

DEFAULT = "nb"

# Primary language subtags (lower case) → the table they pick. "no" and "nn" (nynorsk)
# readers read bokmål far better than English.
TAGS: dict[str, str] = {"nb": "nb", "no": "nb", "nn": "nb", "en": "en"}

NB: dict[str, str] = {
    "site": "Juridisk assistent for norsk rett",
    "title_suffix": "Juridisk assistent",
    "skip": "Hopp til innholdet",
    "footer": (
        "Svarene viser til norske lover og forskrifter på {lovdata}. Hver økt er en "
        "privat, isolert forskningsassistent; den stopper etter en tid uten aktivitet."
    ),
    "start": "Start en ny økt",
    "landing_title": "Start",
    "landing_h1": "Finn fram i norsk lov med en KI-assistent",
    "landing_intro": (
        "Still spørsmål om norske lover og forskrifter med dine egne ord. Assistenten "
        "søker i Lovdata og svarer med nøyaktige henvisninger til bestemmelsene (for "
        "eksempel {example}), med lenke til lovdata.no."
    ),
    "landing_example": "arbeidsmiljøloven § 15-7",
    "landing_advice": "Svarene er juridisk informasjon, ikke juridisk rådgivning.",
    "landing_places": (
        "{used} av {limit} plasser er i bruk nå. Økten din er privat for denne nettleseren."
    ),
    "full_one": "Den eneste plassen er i bruk nå – den blir ledig om {wait}; start økten din da.",
    "full_all": "Alle {limit} plassene er i bruk nå – en blir ledig om {wait}; start økten din da.",
    "refused_one": "Den eneste plassen er i bruk – prøv igjen om {wait}.",
    "refused_all": "Alle {limit} plassene er i bruk – prøv igjen om {wait}.",
    "too_many_starts": "Du har startet {limit} økter nylig – prøv igjen om {wait}.",
    "per_client": (
        "Adressen din har allerede {n} økt(er) i gang, så mange som én adresse kan ha. "
        "Bruk den du har, eller prøv igjen om {wait}."
    ),
    "switch_title": "Bytte økt?",
    "switch_current": "Denne nettleseren er allerede i økt {current} (startet {started}).",
    "switch_other": "Lenken du åpnet, gjelder en annen økt: {other}.",
    "switch_warning": (
        "Bytter du, forlater nettleseren økt {current}, og du kommer bare tilbake til den "
        "med en ny lenke. Bytt bare hvis du selv har fått lenken fra noen du stoler på: "
        "den som har laget lenken, kan lese det du skriver i den økten."
    ),
    "switch_button": "Bytt til økt {other}",
    "switch_stay": "Bli i økt {current}",
    "progress_start_title": "Økten din startes",
    "progress_start_text": ("Din private forskningsassistent gjøres klar; det tar noen sekunder."),
    "progress_wake_title": "Økten din vekkes",
    "progress_wake_text": (
        "Økten din ble satt på pause etter en stund uten aktivitet. Den starter igjen med "
        "alt du hadde; det tar noen sekunder."
    ),
    "progress_label": "Framdrift",
    "progress_wait": "Vent litt …",
    "progress_continues": "Siden går videre av seg selv når økten er klar.",
    "status_ready": "Økten er klar. Åpner den …",
    "status_starting": "Starter …",
    "status_waking": "Vekker økten …",
    "status_failed": "Økten stoppet med en feil ({reason}).",
    "status_retry": "Prøver igjen om {seconds} s.",
    "status_not_yet": "Ikke klar ennå.",
    "status_error": "Noe gikk galt. Last inn siden på nytt.",
    "not_here_title": "Ikke tilgjengelig her",
    "not_here_route": (
        "{what}: dette er ikke tilgjengelig i denne tjenesten; nettleseren kan bare bruke "
        "det chatten trenger."
    ),
    "not_here_websocket": "{what}: WebSocket-forbindelser er ikke tilgjengelige i denne tjenesten.",
    "back": "Tilbake til økten din",
    "seconds": "{n} s",
    "minutes": "{n} min",
    "hours": "{n} t",
    # Error titles and texts by error code (lovd/errors.py); {detail} is lovd's English
    # detail, shown only where it names something a person can act on.
    "error.bad-request": "Ugyldig forespørsel",
    "error.invalid-json": "Ugyldig forespørsel",
    "error.invalid-session-id": "Ugyldig økt-lenke",
    "error.unauthorized": "Ingen økt",
    "error.forbidden": "Ikke tillatt",
    "error.not-found": "Finnes ikke",
    "error.session-not-found": "Økten finnes ikke",
    "error.method-not-allowed": "Ikke tillatt",
    "error.conflict": "Konflikt",
    "error.body-too-large": "For stor forespørsel",
    "error.unsupported-media-type": "Ugyldig forespørsel",
    "error.too-many-sessions": "Alle plassene er i bruk",
    "error.quota-exceeded": "Lagringsplassen er brukt opp",
    "error.rate-limited": "For mange forsøk",
    "error.link-used": "Lenken er allerede brukt",
    "error.internal": "Intern feil",
    "error.runner-failed": "Økten kunne ikke startes",
    "error.unavailable": "Ikke tilgjengelig akkurat nå",
    "error.image-missing": "Tjenesten er ikke ferdig satt opp",
    "error.start-timeout": "Økten ble ikke klar i tide",
    "text.bad-request": "Forespørselen kunne ikke brukes ({detail}).",
    "text.invalid-json": "Forespørselen kunne ikke leses.",
    "text.invalid-session-id": "Lenken peker ikke på en gyldig økt. Start en ny økt.",
    "text.unauthorized": (
        "Du har ingen gyldig økt her: lenken kan være gammel, eller økten er slettet. "
        "Start en ny økt."
    ),
    "text.forbidden": "Dette er ikke tillatt her.",
    "text.expired": "Økten din er utløpt. Start en ny økt.",
    "text.foreign-start": "Økter kan bare startes fra denne sidens egen forside.",
    "text.foreign-switch": "Du kan bare bytte økt fra denne sidens egen side for det.",
    "text.link-used": (
        "Denne lenken er allerede brukt: en øktlenke virker bare én gang. Er det du som "
        "brukte den i denne nettleseren, går du til forsiden. Ellers: be den som ga deg "
        "lenken, om en ny."
    ),
    "text.paused-unused": (
        "Økten ble satt på pause fordi den ikke ble brukt. Last inn siden på nytt eller "
        "send en melding for å vekke den."
    ),
    "text.not-found": "Det finnes ingenting på {path}.",
    "text.session-not-found": "Økten finnes ikke (lenger). Start en ny økt.",
    "text.method-not-allowed": "Dette er ikke tillatt her.",
    "text.conflict": "Det skjedde noe samtidig; prøv igjen.",
    "text.body-too-large": "Forespørselen er for stor.",
    "text.unsupported-media-type": "Forespørselen kunne ikke leses.",
    "text.too-many-sessions": "Alle plassene er i bruk. Prøv igjen om litt.",
    "text.quota-exceeded": "Økten har brukt opp lagringsplassen sin. Start en ny økt.",
    "text.rate-limited": "For mange mislykkede forsøk fra adressen din. Prøv igjen om {wait}.",
    "text.internal": "Noe gikk galt hos oss. Prøv igjen om litt.",
    "text.runner-failed": "Økten kunne ikke startes. Start en ny økt, eller prøv igjen om litt.",
    "text.unavailable": "Tjenesten er ikke tilgjengelig akkurat nå. Prøv igjen om litt.",
    "text.failed": "Økten stoppet med en feil ({reason}). Start en ny økt.",
    "text.image-missing": (
        "Tjenesten er ikke ferdig satt opp (øktbildet mangler). Si fra til den som driver "
        "tjenesten."
    ),
    "text.start-timeout": "Økten ble ikke klar i tide. Prøv igjen om litt.",
}

EN: dict[str, str] = {
    "site": "Norwegian legal research",
    "title_suffix": "Legal research",
    "skip": "Skip to content",
    "footer": (
        "Answers cite Norwegian laws and regulations from {lovdata}. Each session is a "
        "private, isolated research assistant; it ends after a period of inactivity."
    ),
    "start": "Start a new session",
    "landing_title": "Start",
    "landing_h1": "Research Norwegian law with an AI assistant",
    "landing_intro": (
        "Ask questions about Norwegian laws and regulations in plain language. The "
        "assistant searches Lovdata and answers with exact references to the provisions "
        "(for example {example}), linked to lovdata.no."
    ),
    "landing_example": "arbeidsmiljøloven § 15-7",
    "landing_advice": "The answers are legal information, not legal advice.",
    "landing_places": (
        "{used} of {limit} places are in use right now. Your session is private to this browser."
    ),
    "full_one": "The only place is in use right now — it frees up within {wait}; start your "
    "session then.",
    "full_all": "All {limit} places are in use right now — one should free up within {wait}; "
    "start your session then.",
    "refused_one": "The only place is in use — try again in {wait}.",
    "refused_all": "All {limit} places are in use — try again in {wait}.",
    "too_many_starts": "You have started {limit} sessions recently — try again in {wait}.",
    "per_client": (
        "Your address already has {n} session(s) running, the most one address may have. "
        "Use the one you have, or try again in {wait}."
    ),
    "switch_title": "Switch session?",
    "switch_current": "This browser is already in session {current} (started {started}).",
    "switch_other": "The link you opened is for another session: {other}.",
    "switch_warning": (
        "If you switch, this browser leaves session {current}, and only a new link brings "
        "it back. Switch only if you were given this link by someone you trust: whoever "
        "made the link can read what you write in that session."
    ),
    "switch_button": "Switch to session {other}",
    "switch_stay": "Stay in session {current}",
    "progress_start_title": "Starting your session",
    "progress_start_text": (
        "Your private research assistant is being prepared; this takes a few seconds."
    ),
    "progress_wake_title": "Waking up your session",
    "progress_wake_text": (
        "Your session was paused after a while without activity. It is starting again "
        "with everything you had; this takes a few seconds."
    ),
    "progress_label": "Progress",
    "progress_wait": "Please wait…",
    "progress_continues": "This page continues on its own when the session is ready.",
    "status_ready": "Your session is ready. Opening it…",
    "status_starting": "Starting…",
    "status_waking": "Waking up…",
    "status_failed": "This session failed ({reason}).",
    "status_retry": "Trying again in {seconds} s.",
    "status_not_yet": "Not available yet.",
    "status_error": "Something went wrong. Reload the page.",
    "not_here_title": "Not available here",
    "not_here_route": (
        "{what}: it is not available in this service: a session's browser may use only "
        "what the chat needs."
    ),
    "not_here_websocket": "{what}: WebSocket connections are not available in this service.",
    "back": "Back to your session",
    "seconds": "{n} s",
    "minutes": "{n} min",
    "hours": "{n} h",
    "error.bad-request": "Bad request",
    "error.invalid-json": "Bad request",
    "error.invalid-session-id": "Invalid session link",
    "error.unauthorized": "No session",
    "error.forbidden": "Not allowed",
    "error.not-found": "Not found",
    "error.session-not-found": "Session not found",
    "error.method-not-allowed": "Not allowed",
    "error.conflict": "Conflict",
    "error.body-too-large": "Request too large",
    "error.unsupported-media-type": "Bad request",
    "error.too-many-sessions": "All places are in use",
    "error.quota-exceeded": "Storage used up",
    "error.rate-limited": "Too many attempts",
    "error.link-used": "Link already used",
    "error.internal": "Internal error",
    "error.runner-failed": "The session could not start",
    "error.unavailable": "Not available right now",
    "error.image-missing": "The service is not fully set up",
    "error.start-timeout": "The session did not become ready in time",
    # In English, lovd's own detail is the text (it says what happened and what to do).
}

TEXTS: dict[str, dict[str, str]] = {"nb": NB, "en": EN}
HTML_LANG = {"nb": "nb", "en": "en"}


def negotiate(accept_language: str | None) -> str:
    """The language to answer in: the browser's most preferred one that lovd has
    (RFC 9110 ``Accept-Language`` with q-values), else Norwegian bokmål."""
    best: tuple[float, int, str] | None = None
    for i, item in enumerate((accept_language or "").split(",")):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        lang = TAGS.get(tag.strip().lower().split("-")[0])
        if lang is None or q <= 0:
            continue
        if best is None or q > best[0]:
            best = (q, i, lang)
    return best[2] if best else DEFAULT


def text(lang: str, key: str, **values: object) -> str:
    """One text, filled in; a key a language lacks falls back to bokmål."""
    table = TEXTS.get(lang, NB)
    template = table.get(key) or NB[key]
    return template.format(**values) if values else template


def human_seconds(seconds: int, lang: str = "en") -> str:
    if seconds < 90:
        return text(lang, "seconds", n=seconds)
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return text(lang, "minutes", n=minutes)
    return text(lang, "hours", n=math.ceil(minutes / 60))
