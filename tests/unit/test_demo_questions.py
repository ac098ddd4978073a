"""The demo question set through the Lovdata stand-in and the stub model, in-process:
every question as people ask it must be answered with the right provision's lovdata.no
link first (or name the law the corpus does not hold). The same set runs through the
real OpenCode in tests/integration/test_demo_questions.py."""

from __future__ import annotations

import pytest

pytest.importorskip("mcp")

from mcp import Client

from lovd.demo import default_corpus_path
from lovd.demo.corpus import Corpus
from lovd.demo.lovdata_mcp import CallLog, build_server
from tests import demo_questions

REQUIRED_HIT_RATE = 0.9


def test_the_set_is_big_and_covers_the_corpus() -> None:
    questions = demo_questions.load()
    assert len(questions) >= 30
    corpus = Corpus.load(default_corpus_path())
    urls = {p.url for p in corpus.provisions}
    cited = {q.cite for q in questions if q.cite}
    assert cited <= urls, cited - urls
    assert len(cited) == len(urls)  # every provision of the corpus is asked about
    headings = {p.heading.lower() for p in corpus.provisions if p.heading}
    assert not [q.ask for q in questions if q.ask.lower().rstrip("?") in headings]


async def test_every_question_is_answered_with_its_provision() -> None:
    corpus = Corpus.load(default_corpus_path())
    server = build_server(corpus, CallLog(None))
    questions = demo_questions.load()
    wrong: list[str] = []
    async with Client(server) as client:
        tools = await demo_questions.openai_tools(client)
        for q in questions:
            answer, called = await demo_questions.ask(client, tools, q.ask)
            if not q.check(answer):
                wrong.append(f"{q.ask!r} -> {called}\n{answer[:600]}")
            if q.cite:
                # The method: search (or resolve), read the provision, follow its references.
                assert called[1:] == ["get_provision", "get_cross_references"], (q.ask, called)
    rate = 1 - len(wrong) / len(questions)
    print(f"demo questions answered right in-process: {rate:.0%} of {len(questions)}")
    assert rate >= REQUIRED_HIT_RATE, "\n\n".join(wrong)
    assert not wrong, "\n\n".join(wrong)  # the set is tuned to 100 %; a miss is a regression


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        # The README's example and the question from issue 17: the rule itself, quoted.
        (
            "Hva sier arbeidsmiljøloven om oppsigelse?",
            "Arbeidstaker kan ikke sies opp uten at det er saklig begrunnet",
        ),
        (
            "Kan arbeidsgiveren si meg opp uten saklig grunn?",
            "Arbeidstaker kan ikke sies opp uten at det er saklig begrunnet",
        ),
        # A section the corpus lacks, and a law it lacks: said plainly.
        ("Hva sier aml § 99-1?", "Jeg fant ikke § 99-1 i arbeidsmiljøloven"),
        ("Hva sier avhl om mangler?", "Jeg fant ikke avhendingslova i Lovdata"),
        ("What does strl say about theft?", "I could not find straffeloven"),
    ],
)
async def test_answers_say_what_they_found(question: str, expected: str) -> None:
    server = build_server(Corpus.load(default_corpus_path()), CallLog(None))
    async with Client(server) as client:
        tools = await demo_questions.openai_tools(client)
        answer, _ = await demo_questions.ask(client, tools, question)
    assert expected in answer, answer
    if "fant ikke" not in expected and "could not" not in expected:
        assert "ikke juridisk rådgivning" in answer and "Henvisninger jeg fulgte" in answer
