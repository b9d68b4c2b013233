"""What the user asks versus what the user pastes: split a message into its request and its documents.

    >>> s = segment("Does drug X lower mortality?\\n\\nContext:\\nWe studied 412 patients ... (p=0.03).")
    >>> s.request, s.document[:10]
    ('Does drug X lower mortality?', 'We studied')

A research-assistant message is often a short request plus a long pasted document (an abstract, a
referral letter, a web page). The document is data: a study of suicide rates reports suicides, a
toxicology case series reports poisonings. Harm is decided on the request, the part of the message
addressed to the assistant; the document is scanned for text addressed to the model (instructions
planted in it: prompt injection), and its sentences that read as a request (a question, an
imperative, "I"/"you") are moved to the request, so a harmful question buried in a paragraph of
medical text is still read.

How a line is placed (pure Python, microseconds; no model):
- A marker opens a document: a line `Context:` / `Abstract:` / `### Input:` / `Document:` ... (alone,
  or followed by the text on the same line), a fenced block, quoted lines (`> ...`), or a line that
  ends with a colon after a lead-in such as "here is the abstract". A request marker (`Question:`,
  `### Instruction:`, `### Response:`, `<START_Q>`, a chat-template turn) closes it.
- An unmarked line is a document when it is long (at least `DOC_MIN_WORDS` words) and reads as
  reporting: most of its sentences carry the register of a paper (numbers, "patients", "were",
  "we", "results", ...) and few carry request cues. Everything else is request: when in doubt,
  the text is read for harm.
- Inside a document, each sentence with a request cue is moved to the request (quoted speech
  inside a document, "the patient said 'I want to die'", is not a cue: it is reported).

`actionable` says whether the request asks to turn the document into something to do (step-by-step
instructions, a recipe, "do it at home"); then the caller scores the document for harm too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DOC_MIN_WORDS = 40

# Lines that open a document (the rest of the line, if any, is its first text).
_DOC_MARKER = re.compile(
    r"^\s*(?:#{1,4}\s*)?(?:context|contexts|abstract|input|document|article|passage|excerpt|source|text|paper|"
    r"study|report|letter|notes?|transcript|email|e-mail|pasted text|contexto|resumen|résumé|contexte|"
    r"zusammenfassung|kontext|contesto|riassunto|resumo)\s*(?:\(.*?\))?\s*:\s*(?P<rest>.*)$", re.I)
# A lead-in ending with a colon: "Here is the abstract:", "Read the following study:".
_LEAD_IN = re.compile(
    r"\b(?:here(?:'s| is| are)|below is|below are|the following|this (?:abstract|study|paper|article|text|document)|"
    r"pasted|attached|excerpt|voici|aquí (?:está|tienes)|hier ist|ecco)\b[^:]{0,80}:\s*$", re.I)
# Lines that close a document and return to the request.
_REQ_MARKER = re.compile(
    r"^\s*(?:#{1,4}\s*)?(?:question|questions|instruction|instructions|task|request|response|answer|pregunta|"
    r"frage|domanda|pergunta)\s*:|^\s*<(?:START_Q|END_Q|START_A)>|^\s*<\|(?:im_start|start_header_id)\|>|"
    r"^\s*\[/?INST\]", re.I)
# Prompt-template boilerplate (Alpaca-style instruction headers, chat-template role names): not the user's words.
_PREAMBLE = re.compile(
    r"^\s*(?:below is an instruction that describes a task(?:, paired with an input that provides further context)?\. "
    r"write a response that appropriately completes the request\.|(?:<\|im_start\|>|<\|start_header_id\|>)?\s*"
    r"(?:system|user|assistant)(?:<\|end_header_id\|>)?\s*$)", re.I)
_FENCE = re.compile(r"^\s*(```|~~~)")
_QUOTE = re.compile(r"^\s*>")
_TEMPLATE_TAGS = re.compile(r"<\|[a-z_]+\|>|</?s>|<(?:START|END)_[QA]>|\[/?INST\]")

_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[¿¡]?[A-Z0-9ÁÉÍÓÚÀÈÌÒÙÂÊÎÔÛÄÖÜÇÑ])|(?<=[.!?])\s*\n")
_WORD = re.compile(r"\w+(?:['’]\w+)?")

# Request cues: a question, a polite or imperative form, first person singular, the assistant addressed.
_I_VERB = (r"am|was|have|had|want|wanted|need|needed|think|feel|felt|take|took|would|will|can|could|should|do|did|"
           r"don't|didn't|can't|'m|'ve|'d|'ll|just|really|also|still|plan|planned|intend|tried|keep|know|wonder|"
           r"found|got|get|live|work|suspect|hate|love|wish|hope|guess|mean|heard|saw|read|bought|missed|forgot")
_IMPERATIVE = (r"^\s*(?:tell|give|show|explain|describe|list|write|draft|compose|summari[sz]e|"
               r"translate|answer|help|provide|make|create|generate|ignore|disregard|forget|pretend|act|imagine|"
               r"suppose|assume|let's|lets|continue|repeat|print|output|reveal|decode|follow|do|don't|stop|start|"
               r"find|calculate|compare|rewrite|paraphrase|outline|walk|teach|recommend|suggest|advise|send|get|"
               r"buy|order|use|put|add|mix|take|go|now|from now on|respond|reply|say)\b")
_BASE_CUES = [
    re.compile(r"\?\s*[\"')\]]*\s*$|^\s*[¿]"),
    re.compile(rf"(?:^|[\s\"'(])I\s+(?:{_I_VERB})\b|^\s*I\b(?!\s*[-–.,)])|\bI['’](?:m|ve|d|ll)\b"),
    re.compile(r"\b(?:me|my|myself|mine)\b", re.I),
    re.compile(r"\b(?:you|your|yours|yourself)\b", re.I),
    re.compile(r"(?<![\w-])(?:u|ur|pls|plz|thx)(?![\w-])"),  # texting forms, lower case only ("Mann-Whitney U test" is not "you")
    re.compile(r"^\s*(?:please|pls|plz|kindly)\b|\bplease\b", re.I),
    re.compile(r"\b(?:can you|could you|would you|will you|i want|i need|i'd like|help me|tell me|show me|"
               r"give me|let me)\b", re.I),
]
# Spanish, French, German, Italian, Portuguese: first person, the assistant addressed, polite forms. Only in a
# sentence that is not English: "ICH" (intracerebral haemorrhage), "com - mon", "du" in a name are not cues.
_FOREIGN = re.compile(r"\b(?:yo|mí|conmigo|usted|ustedes|tú|puedes|podrías|dime|dame|ayúdame|quiero|necesito|"
                      r"je|j'|moi|mon|ma|mes|vous|tu|peux|pouvez|dites|donnez|aidez|veux|voudrais|"
                      r"ich|mir|mich|mein|meine|meinem|meinen|meiner|du|dir|dich|kannst|können sie|bitte|möchte|"
                      r"io|mio|mia|miei|mie|puoi|potresti|dimmi|aiutami|voglio|vorrei|"
                      r"eu|meu|minha|meus|minhas|você|pode|podes|quero|preciso|por favor|s'il vous plaît|per favore)\b",
                      re.I)
_ENGLISH = re.compile(r"\b(?:the|of|and|with|was|were|in|to|for|is|are|that|this|by|from|or|on|than)\b", re.I)
# Roman numerals after a class word are not the pronoun ("group I had stable haemodynamics", "type I diabetes").
_ROMAN_I = re.compile(r"\b(?:group|type|class|phase|stage|grade|level|category|zone|arm|tier|period|cohort|part|"
                      r"complex|series|study|trial|degree|(?:\(\d+\)))\s*I\b", re.I)
_CUES = _BASE_CUES + [re.compile(_IMPERATIVE + r"(?![-'])", re.I)]
# In a pasted document a sentence-initial verb is often a noun ("Use of the lithotomy position ...",
# "Follow-up was ..."): there an imperative counts only with an object after it.
_DOC_CUES = _BASE_CUES + [
    re.compile(_IMPERATIVE + r"\s+(?:me|us|it|this|that|these|those|the|a|an|my|your|all|any|every|everything|how|"
               r"what|why|whether|step|previous|above|prior|earlier|instructions|rules)\b", re.I),
]
# The register of reported research: numbers, study words, third-person past tense.
_REPORTING = re.compile(
    r"\d|%|\b(?:we|our|patients?|participants?|subjects?|cases?|cohort|trial|study|studies|sample|group|groups|"
    r"were|was|has been|have been|is|are|results?|methods?|conclusions?|objectives?|background|aims?|purpose|"
    r"analy[sz]\w*|associated|associations?|significant\w*|compared|included|assessed|measured|evaluated|"
    r"reported|observed|showed|found|increase\w*|decrease\w*|rates?|risk|incidence|prevalence|mortality|"
    r"outcomes?|data|years?|hospital|clinical|treatment|this|these|there|survey|questionnaire|variables?|"
    r"respondents?|volunteers?|population|members|women|men|children|adults|aged|to (?:explore|evaluate|assess|"
    r"determine|investigate|examine|compare|describe|identify|estimate|analy[sz]e|review))\b", re.I)
# A request that asks to act on the document: then the document is read for harm too.
_ACTIONABLE = re.compile(
    r"\b(?:step[- ]by[- ]step|instructions|recipe|walk me through|at home|in my (?:kitchen|garage|lab)|replicate|"
    r"scale (?:it|this) up|synthesi[sz]e|cook|brew|make (?:it|this|them|some|my own)|do (?:it|this|the same) "
    r"(?:myself|at home|to (?:him|her|them|someone))|use (?:it|this|these|that) (?:on|to|against)|apply (?:it|this) "
    r"to (?:my|him|her|them)|turn (?:it|this) into (?:a )?(?:guide|plan|protocol|how-to))\b", re.I)
_QUOTED = re.compile(r"\"[^\"]{0,400}\"|“[^”]{0,400}”|«[^»]{0,400}»")


@dataclass(frozen=True)
class Part:
    role: str  # "request" or "document"
    text: str


@dataclass(frozen=True)
class Segmented:
    parts: tuple[Part, ...] = field(default_factory=tuple)

    @property
    def request(self) -> str:
        return " ".join(p.text for p in self.parts if p.role == "request").strip()

    @property
    def document(self) -> str:
        return " ".join(p.text for p in self.parts if p.role == "document").strip()

    @property
    def actionable(self) -> bool:
        """The request asks to turn the document into something to do (see module docstring)."""
        return bool(self.document) and bool(_ACTIONABLE.search(self.request))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def has_request_cue(sentence: str, *, in_document: bool = False) -> bool:
    """A question, an imperative or polite form, first person singular, or the assistant addressed.
    In a document, quoted speech is reported, not asked: it is removed first."""
    s = _QUOTED.sub(" ", sentence) if in_document else sentence
    s = _ROMAN_I.sub(" ", _TEMPLATE_TAGS.sub(" ", s))
    if any(c.search(s) for c in (_DOC_CUES if in_document else _CUES)):
        return True
    return len(_ENGLISH.findall(s)) < 2 and bool(_FOREIGN.search(s))


def _reads_as_report(line: str) -> bool:
    sents = sentences(line)
    if not sents:
        return False
    cued = [has_request_cue(s) for s in sents]
    reporting = sum(1 for s, c in zip(sents, cued) if not c and _REPORTING.search(s))
    asking = sum(cued)
    return reporting >= 0.4 * len(sents) and asking <= max(1, len(sents) // 3)


def segment(text: str) -> Segmented:
    """Split `text` into request and document parts (see the module docstring)."""
    parts: list[Part] = []
    in_doc = False
    fenced = False
    lines = text.split("\n")

    def add_document_line(line: str) -> None:
        for s in sentences(line):
            parts.append(Part("request" if has_request_cue(s, in_document=True) else "document", s))

    for raw in lines:
        line = raw.strip()
        if _FENCE.match(line):
            fenced = not fenced
            in_doc = fenced
            continue
        if not line:
            continue
        if fenced or _QUOTE.match(line):
            add_document_line(_QUOTE.sub("", line, count=1).strip() if not fenced else line)
            continue
        if _PREAMBLE.match(line):
            continue  # a prompt template's own boilerplate, the same for every request
        m = _REQ_MARKER.match(line)
        if m:
            in_doc = False
            body = _TEMPLATE_TAGS.sub(" ", line[m.end():]).strip()
            if body:
                parts.append(Part("request", body))
            continue
        m = _DOC_MARKER.match(line)
        if m:
            in_doc = True
            if m.group("rest").strip():
                add_document_line(m.group("rest").strip())
            continue
        line = _TEMPLATE_TAGS.sub(" ", line).strip()
        if not line:
            continue
        if in_doc:
            add_document_line(line)
        elif len(_WORD.findall(line)) >= DOC_MIN_WORDS and _reads_as_report(line):
            add_document_line(line)
        else:
            parts.append(Part("request", line))
            if _LEAD_IN.search(line):
                in_doc = True  # what follows the lead-in is the pasted text
    return Segmented(tuple(parts))
