"""Deterministic training corpus for the embedded ``tiny`` tokenizer.

Nothing can be downloaded at run time, so the tokenizer of the embedded default model is trained on text
generated here, from sentence templates and word lists that cover the language of the three simulated
tasks (docs/method.md §9.1) plus generic conversational English:

- math tutoring: word problems with quantities, units and prices, questions about the missing number,
  arithmetic worked in words and symbols;
- document writing: audience, tone, key points, drafts, feedback and revisions;
- medical recommendation: symptoms, durations, yes/no questions such as "do you have a fever?",
  likely diagnoses and advice;
- generic chat: greetings, thanks, yes/no answers, numbers, times and dates.

Design decisions:

- Pure function of ``(seed, n_lines)``: a private :class:`random.Random` drives every choice, so the corpus,
  and with it the trained tokenizer, is bit-identical across runs and machines.
- Words appear lower-case mid-sentence (with the byte-level leading space) and capitalised at the start of
  sentences, plus simple inflections (plural, -ing, -ed), so that BPE learns whole-word tokens for the
  task vocabulary. Numbers use several formats (integers, decimals, prices, percentages) so digits merge
  into common multi-digit tokens.
- Text is ASCII on purpose: the NFKC normaliser and the byte-level alphabet cover any other input.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_W = str.split  # word lists are written as one space-separated string each, to keep this file short

NAMES = _W(
    "Sam Alex Maria John Priya Chen Fatima Lucas Emma Noah Olivia Liam Ava Mia Ethan Sofia Omar Yuki Ana "
    "Leo Zoe Ravi Nina Hugo Ines Kofi Lena Mateo Aisha Ben Clara David Elena Felix Grace Hannah Ivan Jade "
    "Karim Laura Marco Nora Oscar Paula Quinn Rosa Sara Tom Uma Victor Wendy Xavier Yara Zane Amir Bianca "
    "Carlos Dana Erik Farah Gina Hassan Isla Jonas Kira Marta Nadia Pedro Rita Tariq Vera Wei Lin Mei Raj"
)
ITEMS = _W(
    "apple orange banana pencil notebook marble sticker cookie cupcake book ticket coin stamp card shell "
    "flower plant tree box bag bottle cup plate chair table toy ball kite balloon candle egg muffin sandwich "
    "pizza slice pie brick block bead button ribbon sock shirt hat glove shoe pen eraser ruler crayon "
    "marker folder magazine letter envelope bus car bike boat train seat page chapter song game puzzle "
    "robot doll truck lemon peach pear grape cherry carrot potato tomato onion bean nut seed bucket jar "
    "basket tray rose tulip fish bird puppy kitten sheep cow horse chicken duck rabbit"
)
UNITS = _W(
    "meter kilometer centimeter gram kilogram liter milliliter minute hour day week month year mile "
    "inch foot pound dollar cent euro degree percent"
)
PLACES = _W(
    "store school park library bakery market farm garden kitchen office classroom museum zoo beach "
    "hospital clinic pharmacy station city village home shop cafe"
)
MATH_WORDS = _W(
    "add subtract multiply divide sum difference product quotient total remainder equation fraction "
    "decimal percent ratio average area perimeter length width height volume price cost change discount "
    "profit each every altogether left remaining more fewer less twice half double triple equal number "
    "unknown missing value answer solution step check estimate round variable expression"
)
NUMBER_WORDS = _W(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
    "thousand million first second third fourth fifth sixth seventh eighth ninth tenth"
)
DOC_TYPES = _W(
    "email report memo proposal letter summary article essay announcement newsletter blog post speech "
    "review brief agenda invitation press release guide manual resume cover statement abstract outline "
    "policy plan description story poem script note"
)
AUDIENCES = _W(
    "customers investors students teachers parents managers engineers doctors nurses patients employees "
    "executives volunteers members residents readers clients partners donors researchers children "
    "beginners experts colleagues staff team board community public users developers designers"
)
TONES = _W(
    "formal casual friendly professional persuasive warm concise playful serious polite enthusiastic "
    "neutral respectful confident humble direct gentle upbeat technical simple clear empathetic urgent"
)
TOPICS = _W(
    "budget timeline launch schedule meeting project product feature update safety training hiring "
    "fundraiser event conference workshop policy change recycling volunteering wellness security privacy "
    "deadline migration results survey feedback quality costs revenue growth strategy marketing design "
    "research partnership holiday vacation renovation delivery shipping pricing subscription service "
    "warranty refund onboarding software hardware network office move weather garden festival"
)
DOC_WORDS = _W(
    "draft revision paragraph sentence heading title introduction conclusion bullet point key audience "
    "tone style length word count structure section edit rewrite shorten expand polish proofread grammar "
    "spelling clarity flow emphasis example detail reader purpose message goal call action deadline "
    "version feedback suggestion outline theme voice format"
)
SYMPTOMS = _W(
    "fever cough headache sore throat fatigue nausea vomiting diarrhea rash chills dizziness shortness "
    "breath chest pain back stomach ache runny nose congestion sneezing itching swelling joint muscle "
    "weakness confusion thirst sweating wheezing bleeding bruising numbness tingling insomnia anxiety "
    "cramps bloating heartburn earache toothache blurred vision palpitations"
)
DISEASES = _W(
    "influenza cold covid pneumonia bronchitis asthma allergy migraine sinusitis strep tonsillitis "
    "gastroenteritis food poisoning appendicitis diabetes hypertension anemia dehydration measles chickenpox "
    "mononucleosis malaria dengue tuberculosis arthritis gout eczema psoriasis hives shingles conjunctivitis "
    "otitis cystitis kidney stones ulcer reflux concussion sprain fracture"
)
MED_WORDS = _W(
    "doctor nurse patient symptom diagnosis treatment medicine medication dose tablet pill rest fluids "
    "temperature appointment test blood pressure infection virus bacteria antibiotic vaccine allergy pain "
    "severe mild moderate chronic acute sudden gradual recent history condition risk emergency urgent care "
    "recovery prescription checkup clinic specialist"
)
BODY = _W("head throat chest stomach back arm leg knee ankle wrist neck shoulder eye ear nose skin foot hand")
VERBS = _W(
    "have has need want buy sell give take find make help ask answer tell know think feel say see look "
    "share explain write read send call start finish keep bring carry pay spend save earn collect count "
    "measure compare choose decide try use work plan check review describe suggest recommend understand "
    "learn teach solve show mean notice remember forget improve change add remove include mention"
)
ADJECTIVES = _W(
    "big small large tiny new old good great bad better best worse long short high low fast slow easy hard "
    "simple important useful clear short quick careful exact correct wrong right full empty red blue "
    "green yellow happy sad tired busy free ready sure possible likely common rare normal strange"
)
GENERIC_NOUNS = _W(
    "time question idea problem way thing people friend family person place job week today tomorrow "
    "yesterday morning afternoon evening night weekend information detail reason result moment minute "
    "example help thanks sorry problem chance choice plan list message phone water food house room hello "
    "hi hey please yes no okay sure bye goodbye welcome great fine well"
)
TIMES = _W(
    "today yesterday tonight recently lately always usually often sometimes rarely never now soon later "
    "already still again Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March "
    "April May June July August September October November December"
)
GREETINGS = [
    "Hello!", "Hi there.", "Good morning.", "Good afternoon.", "Good evening.", "Hey, how are you?",
    "Thanks so much!", "Thank you.", "You're welcome.", "No problem.", "Sure, happy to help.", "Goodbye.",
    "Have a nice day!", "Nice to meet you.", "Sorry, I don't understand.", "Could you say that again?",
    "Of course.", "Great, thanks!", "That makes sense.", "I'm not sure.", "Let me think.", "Okay.",
    "Yes.", "No.", "Yes, I do.", "No, I don't.", "Yes, it is.", "No, it isn't.", "Maybe.", "I think so.",
]  # fmt: skip

Rng = random.Random


def _num(rng: Rng) -> str:
    kind = rng.random()
    if kind < 0.55:
        return str(rng.randint(0, 100))
    if kind < 0.75:
        return str(rng.randint(100, 9999))
    if kind < 0.85:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"
    if kind < 0.93:
        return f"${rng.randint(1, 500)}.{rng.choice(['00', '25', '50', '75', '99'])}"
    return f"{rng.randint(1, 100)}%"


def _inflect(word: str, rng: Rng) -> str:
    """A crude but deterministic inflection, so BPE sees stems with common suffixes."""
    r = rng.random()
    if r < 0.55 or len(word) < 3:
        return word
    if r < 0.75:
        return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    if r < 0.88:
        return (word[:-1] if word.endswith("e") else word) + "ing"
    return (word[:-1] if word.endswith("e") else word) + "ed"


def _pick(rng: Rng, words: list[str]) -> str:
    return _inflect(rng.choice(words), rng)


def _math(rng: Rng) -> str:
    n, it, it2, pl = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(ITEMS), rng.choice(PLACES)
    a, b, u = _num(rng), _num(rng), rng.choice(UNITS)
    return rng.choice(
        [
            f"{n} has {a} {it}s and buys some more at the {pl}. How many {it}s does {n} have now?",
            f"{n} had some {it}s, gave {a} to {rng.choice(NAMES)}, and has {b} left. How many were there at first?",
            f"How many {it}s did {n} buy? I need that number before I can find the total.",
            f"Each {it} costs {_num(rng)}. What is the price of {a} {it}s and {b} {it2}s?",
            f"The {it} is {a} {u}s long and the {it2} is {b} {u}s long. What is the difference?",
            f"Let x be the number of {it}s. Then x + {a} = {b}, so x = {b} - {a}.",
            f"{a} + {b} = ?  {a} - {b} = ?  {a} * {b} = ?  {a} / {b} = ?",
            f"To solve this, first {_pick(rng, MATH_WORDS)} the {rng.choice(MATH_WORDS)}, then check the {rng.choice(MATH_WORDS)}.",
            f"What is the missing number? The {rng.choice(MATH_WORDS)} is {a} and the {rng.choice(MATH_WORDS)} is unknown.",
            f"The answer is {a} {it}s. {rng.choice(NUMBER_WORDS).capitalize()} step: {_pick(rng, VERBS)} {b} and {_pick(rng, MATH_WORDS)}.",
            f"A {it} weighs {a} {u}s. How much do {rng.choice(NUMBER_WORDS)} {it}s weigh altogether?",
            f"{n} walked {a} {u}s on {rng.choice(TIMES)} and {b} on {rng.choice(TIMES)}. What is the average?",
            f"Could you tell me how many {it}s are in each {it2}? Without it the problem has no single answer.",
            f"The rate is {a} per {u}, so one {u} costs {b}. What is the cost of {rng.choice(NUMBER_WORDS)} {u}s?",
        ]
    )


def _writing(rng: Rng) -> str:
    doc, aud, tone, top = rng.choice(DOC_TYPES), rng.choice(AUDIENCES), rng.choice(TONES), rng.choice(TOPICS)
    w1, w2 = _pick(rng, DOC_WORDS), _pick(rng, DOC_WORDS)
    return rng.choice(
        [
            f"Please write a {tone} {doc} for our {aud} about the {top}.",
            f"Who is the audience for this {doc}? Should the tone be {tone} or {rng.choice(TONES)}?",
            f"The audience is {aud}, the tone should be {tone}, and the key points are {top}, {rng.choice(TOPICS)} and {rng.choice(TOPICS)}.",
            f"Here is a draft: Dear {aud}, we are {_pick(rng, VERBS)} to share an update on the {top}.",
            f"Feedback: the {w1} is too long, make the {w2} more {rng.choice(TONES)} and {_pick(rng, VERBS)} the {top}.",
            f"Key point {rng.randint(1, 9)}: {top} {_pick(rng, VERBS)} {rng.choice(ADJECTIVES)} {rng.choice(GENERIC_NOUNS)}s.",
            f"I revised the {doc}: the {w1} now mentions the {top}, and the {w2} is {rng.choice(ADJECTIVES)}.",
            f"Should I {rng.choice(VERBS)} a {w1} about the {top} for the {aud}?",
            f"Make it {tone}, about {_num(rng)} words, with a clear call to action for the {aud}.",
            f"Thanks, the final draft looks {rng.choice(ADJECTIVES)}. Could you {rng.choice(VERBS)} the {rng.choice(DOC_WORDS)}?",
        ]
    )


def _medical(rng: Rng) -> str:
    s1, s2, dis = rng.choice(SYMPTOMS), rng.choice(SYMPTOMS), rng.choice(DISEASES)
    return rng.choice(
        [
            f"Do you have a {s1}?",
            f"Have you had any {s1} or {s2} {rng.choice(TIMES)}?",
            f"Yes, I have had a {s1} for {rng.choice(NUMBER_WORDS)} days.",
            f"No, I don't have a {s1}, but my {rng.choice(BODY)} hurts.",
            f"I feel {rng.choice(ADJECTIVES)} and my {rng.choice(BODY)} has {s1} and {s2}.",
            f"Based on your symptoms, the most likely diagnosis is {dis}.",
            f"It could be {dis} or {rng.choice(DISEASES)}; a {rng.choice(MED_WORDS)} would help to decide.",
            f"How long have you had the {s1}? Is it {rng.choice(['mild', 'moderate', 'severe'])}?",
            f"Your temperature is {rng.randint(36, 40)}.{rng.randint(0, 9)} degrees. Any {s1}?",
            f"I recommend {_pick(rng, MED_WORDS)} and {rng.choice(MED_WORDS)}; see a {rng.choice(MED_WORDS)} if the {s1} gets worse.",
            f"Does the {s1} get worse at {rng.choice(['night', 'rest', 'work'])}? Any history of {dis}?",
        ]
    )


def _generic(rng: Rng) -> str:
    n = rng.choice(NAMES)
    return rng.choice(
        [
            rng.choice(GREETINGS),
            f"{rng.choice(GREETINGS)} I'm {n}. Can you help me with a {rng.choice(GENERIC_NOUNS)}?",
            f"Is it {rng.choice(ADJECTIVES)}? {rng.choice(['Yes', 'No'])}, it is {rng.choice(ADJECTIVES)}.",
            f"What time is the {rng.choice(TOPICS)}? It starts at {rng.randint(1, 12)}:{rng.choice(['00', '15', '30', '45'])} on {rng.choice(TIMES)}.",
            f"I {_pick(rng, VERBS)} the {rng.choice(GENERIC_NOUNS)} {rng.choice(TIMES)} and it was {rng.choice(ADJECTIVES)}.",
            f"Can you {rng.choice(VERBS)} me {rng.choice(NUMBER_WORDS)} {rng.choice(GENERIC_NOUNS)}s, please?",
            f"There are {_num(rng)} {rng.choice(ITEMS)}s in the {rng.choice(PLACES)}.",
            f"{n} and {rng.choice(NAMES)} went to the {rng.choice(PLACES)} {rng.choice(TIMES)}.",
            f"{rng.choice(['Oh', 'Well', 'So', 'Okay'])}, {rng.choice(GENERIC_NOUNS)} and {rng.choice(GENERIC_NOUNS)}, {n}.",
        ]
    )


_GENERATORS: list[tuple[float, Callable[[Rng], str]]] = [
    (0.3, _math),
    (0.25, _writing),
    (0.25, _medical),
    (0.2, _generic),
]


def generate_corpus(seed: int = 0, n_lines: int = 24_000) -> list[str]:
    """Return ``n_lines`` lines of synthetic task text; the same arguments always give the same lines.

    Each line holds one to three sentences drawn from the task generators with fixed weights
    (math 0.3, writing 0.25, medical 0.25, generic 0.2), and every word list is also emitted once as
    plain text so that rare words are seen at least once.
    """
    rng = random.Random(seed)
    weights = [w for w, _ in _GENERATORS]
    funcs = [f for _, f in _GENERATORS]
    lines = []
    for _ in range(n_lines):
        k = rng.choice((1, 1, 2, 3))
        lines.append(" ".join(rng.choices(funcs, weights)[0](rng) for _ in range(k)))
    for words in (NAMES, ITEMS, UNITS, PLACES, MATH_WORDS, NUMBER_WORDS, DOC_TYPES, AUDIENCES, TONES):
        lines.append(" ".join(words))
    for words in (TOPICS, DOC_WORDS, SYMPTOMS, DISEASES, MED_WORDS, BODY, VERBS, ADJECTIVES, TIMES):
        lines.append(" ".join(words))
    return lines
