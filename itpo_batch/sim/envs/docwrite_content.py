"""The document-writing task's content: scenarios, audiences, tones and the user's fixed replies.

Data only (the task's rules are in :mod:`itpo_batch.sim.envs.docwrite`), like ``math_problems`` for math.
"""

from __future__ import annotations

from typing import NamedTuple


class Scenario(NamedTuple):
    kind: str
    "Document kind with its article, as the user names it."
    topic: str
    purpose: str
    "Completes the opening sentence: 'I am writing {purpose}.'"
    points: tuple[tuple[str, str], ...]
    "(keyword, clause): the keyword marks the point in a draft; the clause is the target wording."


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("an announcement", "the new schedule", "to announce the new schedule", (
        ("meetings", "all meetings now start at nine"), ("fridays", "the office closes early on Fridays"),
        ("parking", "parking moves to lot B"), ("lunch", "lunch breaks are now one hour"),
        ("monday", "the new hours begin next Monday"), ("remote", "remote work is allowed on Wednesdays"))),
    Scenario("a product update", "version two of our app", "to share an update on version two of our app", (
        ("loads", "the app now loads twice as fast"), ("dark", "dark mode is finally available"),
        ("pdf", "reports can be exported to PDF"), ("price", "the monthly price stays the same"),
        ("weekends", "support is now open on weekends"), ("free", "the update is free for all users"))),
    Scenario("a thank-you note", "the charity fundraiser",
             "to thank you for your help with the charity fundraiser", (
        ("dollars", "we raised over five thousand dollars"), ("helpers", "forty helpers joined us"),
        ("bake", "the bake sale sold out by noon"), ("shelter", "the money goes to the local shelter"),
        ("photos", "photos are on our website"), ("spring", "the next event is planned for spring"))),
    Scenario("an invitation", "our summer picnic", "to invite you to our summer picnic", (
        ("saturday", "it starts at noon on Saturday"), ("riverside", "it takes place in Riverside Park"),
        ("drinks", "food and drinks are provided"), ("families", "families and kids are welcome"),
        ("replies", "replies are due by Friday"), ("music", "there will be live music"))),
    Scenario("a blog intro", "my new cooking blog", "to introduce my new blog about cooking at home", (
        ("money", "cooking at home saves money"), ("twenty", "simple recipes take twenty minutes"),
        ("vegetables", "fresh vegetables make a big difference"), ("knife", "a sharp knife is the best tool"),
        ("planning", "meal planning reduces stress"), ("post", "every post shares one new recipe"))),
    Scenario("a reminder", "the quarterly review", "to remind you about the quarterly review", (
        ("thursday", "reports are due on Thursday"), ("room", "the meeting is in room four"),
        ("slides", "slides should have at most ten pages"), ("presents", "each group presents for ten minutes"),
        ("feedback", "managers will share feedback afterwards"), ("agenda", "the agenda is in the shared folder"))),
)  # fmt: skip


class Audience(NamedTuple):
    address: str
    "How the document addresses the reader ('Dear {address}, ...')."
    marker: str
    "The word that shows the address in a draft."
    described: str
    "How the user names the audience."


AUDIENCES: dict[str, Audience] = {
    "team": Audience("everyone on the team", "team", "my team"),
    "customers": Audience("our valued customers", "customers", "our customers"),
    "manager": Audience("Ms. Rivera", "rivera", "my manager, Ms. Rivera"),
    "friends": Audience("my dear friends", "friends", "my friends"),
    "neighbors": Audience("all our neighbors", "neighbors", "my neighbors"),
    "members": Audience("fellow club members", "members", "the members of my club"),
}


class Tone(NamedTuple):
    opening: str
    "Opening sentence, with {address} and {purpose}."
    point: str
    "One key point, with {clause}."
    closing: str
    "Closing line (length 'detailed' only)."
    markers: tuple[str, ...]
    "Phrases that show this tone in a draft."


TONES: dict[str, Tone] = {
    "formal": Tone("Dear {address}, I am writing {purpose}.", "Please note that {clause}.",
                   "Thank you for your attention.", ("i am writing", "please note that", "thank you for your attention")),
    "friendly": Tone("Hi {address}, I just wanted {purpose}.", "Just so you know, {clause}.",
                     "Let me know if you have any questions.", ("i just wanted", "just so you know", "let me know")),
    "enthusiastic": Tone("Hello {address}! I am thrilled {purpose}!", "Great news: {clause}!",
                         "Thanks so much, this is going to be amazing!", ("i am thrilled", "great news", "thanks so much")),
    "casual": Tone("Hey {address}, quick note {purpose}.", "Oh, and {clause}.",
                   "Cheers, talk soon.", ("quick note", "oh and", "cheers")),
}  # fmt: skip

LENGTHS = ("short", "detailed")
CATEGORIES = ("tone", "audience", "points", "length")
"Question categories, in the order the scripted policy asks them."

KEYWORDS: dict[str, tuple[str, ...]] = {
    "audience": ("audience", "reader", "readers", "recipient", "recipients", "addressed", "who",
                 "who will read", "send it to"),
    "tone": ("tone", "style", "formal", "formality", "casual", "friendly", "enthusiastic", "voice",
             "how should it sound", "mood"),
    "length": ("length", "long", "short", "sentences", "closing", "brief", "word count", "how much"),
    "points": ("points", "point", "mention", "include", "details", "topics", "say", "information",
               "content", "key", "cover", "facts"),
}  # fmt: skip

ASK: dict[str, str] = {
    "tone": "What tone should it have?",
    "audience": "Who is the audience?",
    "points": "What key points should I mention?",
    "length": "How long should it be?",
}
IRRELEVANT = ("Which font would you like?", "Do you want a title?", "Should I add emojis?",
              "Should I use bold text?")  # fmt: skip
SYSTEM = (
    "You help the user write a short document. Ask about the audience, tone, key points or length, "
    "show a draft as 'Draft: ...', and finish with 'Final draft: ...'."
)
VAGUE = "Hmm, I'm not sure. Whatever you think is best."
VAGUE_FEEDBACK = "Hmm, something is not quite right, but I can't say what."
CONFUSED = "Sorry, I don't understand. Can you ask me about the document or show me a draft?"
