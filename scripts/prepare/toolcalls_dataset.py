"""Embedded default dataset: natural-language requests -> JSON tool calls.

A deterministic, download-free generator of chat records (OpenAI `messages` format) in which the
assistant answers a user request with exactly one JSON call `{"name": ..., "arguments": {...}}` to
one of eight tools. It is sized for a tiny model: argument values appear literally in the request,
the tool is picked by clear cues, and records stay short.

`generate(seed)` returns train/valid/test splits with the tools balanced in each split. Some
phrasing templates of every tool are used only in test (half of the test records use them), and no
request string occurs twice anywhere, so test measures generalisation rather than recall.
`check_call(text)` scores a model answer: JSON validity and JSON-Schema validity of its arguments.

Run as a script to self-check the generator and print counts and examples.
"""

from __future__ import annotations

import datetime
import json
import random
import string
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CAD", "AUD", "CHF", "INR"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Japanese", "Chinese", "Dutch"]
UNITS = ["celsius", "fahrenheit"]


def _obj(properties: dict[str, dict], required: list[str]) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_TEXT = {"type": "string", "minLength": 1}

TOOLS: list[dict] = [
    {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": _obj(
            {"city": _TEXT, "unit": {"type": "string", "enum": UNITS}},
            ["city"],
        ),
    },
    {
        "name": "set_timer",
        "description": "Start a countdown timer.",
        "parameters": _obj(
            {"minutes": {"type": "integer", "minimum": 1, "maximum": 1440}, "label": _TEXT},
            ["minutes"],
        ),
    },
    {
        "name": "send_email",
        "description": "Send an email.",
        "parameters": _obj(
            {
                "to": {"type": "string", "pattern": r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$"},
                "subject": _TEXT,
                "body": _TEXT,
            },
            ["to", "subject", "body"],
        ),
    },
    {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another.",
        "parameters": _obj(
            {
                "amount": {"type": "number", "exclusiveMinimum": 0},
                "from_currency": {"type": "string", "enum": CURRENCIES},
                "to_currency": {"type": "string", "enum": CURRENCIES},
            },
            ["amount", "from_currency", "to_currency"],
        ),
    },
    {
        "name": "search_web",
        "description": "Search the web.",
        "parameters": _obj({"query": _TEXT}, ["query"]),
    },
    {
        "name": "create_event",
        "description": "Add an event to the calendar.",
        "parameters": _obj(
            {
                "title": _TEXT,
                "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "format": "date"},
                "time": {"type": "string", "pattern": r"^\d{2}:\d{2}$"},
            },
            ["title", "date"],
        ),
    },
    {
        "name": "play_music",
        "description": "Play music by an artist, optionally a specific song.",
        "parameters": _obj({"artist": _TEXT, "song": _TEXT}, ["artist"]),
    },
    {
        "name": "translate_text",
        "description": "Translate text into another language.",
        "parameters": _obj(
            {"text": _TEXT, "target_language": {"type": "string", "enum": LANGUAGES}},
            ["text", "target_language"],
        ),
    },
]


def _signature(tool: dict) -> str:
    params = tool["parameters"]
    args = [k if k in params["required"] else f"{k}?" for k in params["properties"]]
    return f"{tool['name']}({', '.join(args)})"


SYSTEM_PROMPT: str = (
    'Answer with exactly one JSON object {"name": ..., "arguments": {...}}. Tools: '
    + ", ".join(_signature(t) for t in TOOLS)
    + "."
)


def tool_schemas() -> dict[str, dict]:
    return {t["name"]: t["parameters"] for t in TOOLS}


def call_text(name: str, arguments: dict) -> str:
    order = list(tool_schemas().get(name, {}).get("properties", {}))
    ordered = {k: arguments[k] for k in order if k in arguments}
    ordered.update({k: v for k, v in arguments.items() if k not in ordered})
    return json.dumps({"name": name, "arguments": ordered}, ensure_ascii=False)


_VALIDATORS = {
    name: Draft202012Validator(schema, format_checker=FormatChecker()) for name, schema in tool_schemas().items()
}


def _reject_constant(token: str) -> Any:
    raise ValueError(f"not JSON: {token}")


def check_call(text: str) -> dict:
    """Score one answer; `name` is reported whenever the object has a string name."""
    try:
        call = json.loads(text.strip(), parse_constant=_reject_constant)
    except ValueError:
        return {"json_valid": False, "schema_valid": False, "name": None}
    name = call.get("name") if isinstance(call, dict) else None
    name = name if isinstance(name, str) else None
    valid = (
        isinstance(call, dict)
        and set(call) == {"name", "arguments"}
        and name in _VALIDATORS
        and isinstance(call["arguments"], dict)
        and _VALIDATORS[name].is_valid(call["arguments"])
    )
    return {"json_valid": True, "schema_valid": bool(valid), "name": name}


# --- entity pools -------------------------------------------------------------------------------

CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "New York",
    "Berlin",
    "Madrid",
    "Rome",
    "Lisbon",
    "Amsterdam",
    "Vienna",
    "Prague",
    "Dublin",
    "Oslo",
    "Stockholm",
    "Helsinki",
    "Copenhagen",
    "Warsaw",
    "Budapest",
    "Athens",
    "Istanbul",
    "Cairo",
    "Nairobi",
    "Lagos",
    "Cape Town",
    "Mumbai",
    "Delhi",
    "Bangkok",
    "Singapore",
    "Seoul",
    "Beijing",
    "Shanghai",
    "Hong Kong",
    "Sydney",
    "Melbourne",
    "Auckland",
    "Toronto",
    "Vancouver",
    "Montreal",
    "Chicago",
    "Boston",
    "Seattle",
    "San Francisco",
    "Los Angeles",
    "Denver",
    "Austin",
    "Miami",
    "Mexico City",
    "Buenos Aires",
    "Lima",
    "Santiago",
    "Bogota",
    "Sao Paulo",
    "Reykjavik",
    "Zurich",
    "Edinburgh",
    "Barcelona",
    "Munich",
    "Kyoto",
    "Dubai",
    "Marrakech",
]
TIMER_LABELS = [
    "pasta",
    "laundry",
    "tea",
    "eggs",
    "pizza",
    "rice",
    "nap",
    "workout",
    "break",
    "bread",
    "cookies",
    "homework",
    "meditation",
    "stretching",
    "parking",
    "coffee",
    "study session",
    "oven",
    "plank",
    "reading",
    "cake",
    "soup",
    "focus",
    "call",
    "cleanup",
]
COMMON_MINUTES = [1, 2, 3, 5, 7, 8, 10, 12, 15, 20, 25, 30, 40, 45, 50, 60, 75, 90, 120, 180]
FIRST_NAMES = [
    "anna",
    "ben",
    "carla",
    "david",
    "emma",
    "felix",
    "grace",
    "hugo",
    "iris",
    "jack",
    "kate",
    "liam",
    "mia",
    "noah",
    "olivia",
    "paul",
    "quinn",
    "rosa",
    "sam",
    "tina",
    "umar",
    "vera",
    "will",
    "xena",
    "yusuf",
    "zoe",
    "maria",
    "omar",
    "lena",
    "tom",
    "sofia",
    "ivan",
    "nina",
    "leo",
    "ella",
    "raj",
]
LAST_NAMES = [
    "smith",
    "garcia",
    "muller",
    "rossi",
    "kim",
    "silva",
    "novak",
    "jones",
    "tanaka",
    "brown",
    "lopez",
    "martin",
    "chen",
    "patel",
    "weber",
    "dubois",
    "costa",
    "berg",
    "khan",
    "walsh",
]
DOMAINS = ["example.com", "example.org", "acme.io", "contoso.com", "globex.net", "initech.co"]
SUBJECTS = [
    "Lunch tomorrow",
    "Project update",
    "Meeting notes",
    "Invoice 2041",
    "Weekend plans",
    "Quick question",
    "Report draft",
    "Dinner on Friday",
    "Flight details",
    "Budget review",
    "Happy birthday",
    "Team offsite",
    "Contract renewal",
    "Book club",
    "Car pickup",
    "Thank you",
    "New schedule",
    "Holiday photos",
    "Rent payment",
    "Job interview",
    "Server outage",
    "Design feedback",
    "Sprint planning",
    "Wedding RSVP",
    "Gym membership",
]
BODIES = [
    "See you at noon",
    "The draft is attached",
    "Can we move it to Monday",
    "Thanks for your help",
    "Running ten minutes late",
    "Please review by Friday",
    "The meeting is canceled",
    "I will call you tonight",
    "Payment was sent today",
    "Let me know what you think",
    "The keys are under the mat",
    "Dinner is at seven",
    "Happy birthday from all of us",
    "The build is green again",
    "Please bring the slides",
    "I booked the tickets",
    "Call me when you land",
    "Great job on the launch",
    "We need two more chairs",
    "The report is ready",
    "Can you send the invoice",
    "Welcome to the team",
    "Lunch is on me",
    "The office is closed tomorrow",
    "Do not forget the charger",
]
QUERIES = [
    "best hiking trails in Utah",
    "how to fix a leaking faucet",
    "latest news on electric cars",
    "python list comprehension examples",
    "history of the Roman empire",
    "cheap flights to Lisbon",
    "vegan lasagna recipe",
    "how do vaccines work",
    "top rated sci-fi novels",
    "symptoms of vitamin D deficiency",
    "how to train a puppy",
    "when was the Eiffel Tower built",
    "best budget laptops",
    "rules of cricket",
    "how to make a sourdough starter",
    "distance from Earth to Mars",
    "tips for a job interview",
    "how to change a bike tire",
    "who invented the telephone",
    "population of Canada",
    "how to knit a scarf",
    "meaning of the word serendipity",
    "best board games for families",
    "how to grow tomatoes indoors",
    "opening hours of the Louvre",
    "how solar panels work",
    "easy chess openings",
    "origin of the Olympic games",
    "how to remove coffee stains",
    "healthy breakfast ideas",
    "how to meditate for beginners",
    "tallest mountains in Africa",
    "how to write a cover letter",
    "causes of the First World War",
    "largest lakes in the world",
    "how to clean a cast iron pan",
    "how to tie a tie",
    "best sushi restaurants in Osaka",
    "what is quantum computing",
    "cheapest electric bikes",
    "how to start a vegetable garden",
    "signs of dehydration",
    "how to negotiate a salary",
    "benefits of green tea",
    "how to brew cold brew coffee",
    "famous paintings by Van Gogh",
    "how to fold a fitted sheet",
    "how to jump start a car",
    "best national parks in Canada",
    "how to lower cholesterol",
    "fastest land animals",
    "how to set up a home network",
    "what causes the northern lights",
    "best podcasts about history",
    "how to care for a succulent",
    "ancient wonders of the world",
    "how to improve sleep quality",
    "how to learn touch typing",
]
EVENT_TITLES = [
    "Team standup",
    "Dentist appointment",
    "Lunch with Maria",
    "Project kickoff",
    "Yoga class",
    "Parent teacher meeting",
    "Car service",
    "Birthday party",
    "Book club",
    "Quarterly review",
    "Flight to Berlin",
    "Haircut",
    "Doctor visit",
    "Coffee with Sam",
    "Piano lesson",
    "Team retrospective",
    "Movie night",
    "Soccer practice",
    "Job interview",
    "Budget meeting",
    "Date night",
    "Client call",
    "Code review",
    "Wedding rehearsal",
    "Vet appointment",
    "Farmers market",
    "Study group",
    "Board meeting",
    "Gym session",
    "Guitar lesson",
]
SONGS = {
    "The Beatles": ["Yesterday", "Let It Be", "Hey Jude"],
    "Queen": ["Bohemian Rhapsody", "Don't Stop Me Now"],
    "Adele": ["Hello", "Someone Like You"],
    "Taylor Swift": ["Shake It Off", "Love Story"],
    "Ed Sheeran": ["Perfect", "Shape of You"],
    "Daft Punk": ["Get Lucky", "One More Time"],
    "Coldplay": ["Yellow", "Fix You"],
    "Nirvana": ["Come as You Are", "Lithium"],
    "Michael Jackson": ["Billie Jean", "Thriller"],
    "Bob Marley": ["Three Little Birds", "Redemption Song"],
    "ABBA": ["Dancing Queen", "Waterloo"],
    "Radiohead": ["Creep", "Karma Police"],
    "Miles Davis": ["So What", "Blue in Green"],
    "Billie Eilish": ["Bad Guy", "Ocean Eyes"],
    "Bruno Mars": ["Grenade", "24K Magic"],
    "Dua Lipa": ["Levitating", "New Rules"],
    "The Weeknd": ["Blinding Lights", "Save Your Tears"],
    "Elvis Presley": ["Hound Dog", "Suspicious Minds"],
    "Fleetwood Mac": ["Dreams", "Landslide"],
    "Stevie Wonder": ["Superstition", "Isn't She Lovely"],
    "Oasis": ["Wonderwall", "Champagne Supernova"],
    "Shakira": ["Hips Don't Lie", "Whenever, Wherever"],
    "Norah Jones": ["Don't Know Why", "Come Away with Me"],
    "David Bowie": ["Heroes", "Starman"],
    "Aretha Franklin": ["Respect", "Think"],
    "Prince": ["Purple Rain", "Kiss"],
}
PHRASES = [
    "Good morning",
    "Where is the train station?",
    "How much does this cost?",
    "Thank you very much",
    "I would like a coffee",
    "See you tomorrow",
    "The bill, please",
    "I am lost",
    "Do you speak English?",
    "Nice to meet you",
    "What time is it?",
    "I love this city",
    "Can you help me?",
    "Happy birthday",
    "Where is the bathroom?",
    "I have a reservation",
    "The food was delicious",
    "Good night",
    "How are you?",
    "I don't understand",
    "Please speak slowly",
    "Is this seat free?",
    "I need a doctor",
    "Open the window",
    "We are leaving now",
    "My name is Alex",
    "Turn left at the bank",
    "The museum opens at nine",
    "I'm allergic to peanuts",
    "Let's go to the beach",
]
_YEAR_START = datetime.date(2026, 1, 1)


# --- argument samplers --------------------------------------------------------------------------


def _maybe(rng: random.Random, p: float, value: Any) -> Any:
    return value if rng.random() < p else None


def _weather(rng: random.Random) -> dict:
    return {"city": rng.choice(CITIES), "unit": _maybe(rng, 0.5, rng.choice(UNITS))}


def _timer(rng: random.Random) -> dict:
    minutes = rng.choice(COMMON_MINUTES) if rng.random() < 0.7 else rng.randint(1, 600)
    return {"minutes": minutes, "label": _maybe(rng, 0.5, rng.choice(TIMER_LABELS))}


def _email_address(rng: random.Random) -> str:
    first, last, domain = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(DOMAINS)
    user = rng.choice([first, f"{first}.{last}", f"{first[0]}{last}"])
    return f"{user}@{domain}"


def _email(rng: random.Random) -> dict:
    return {"to": _email_address(rng), "subject": rng.choice(SUBJECTS), "body": rng.choice(BODIES)}


def _amount(rng: random.Random) -> int | float:
    if rng.random() < 0.5:
        return rng.choice([5, 10, 20, 25, 50, 75, 100, 150, 200, 250, 500, 1000, 2500])
    cents = rng.randint(100, 500_000)
    return cents // 100 if cents % 100 == 0 else cents / 100


def _currency(rng: random.Random) -> dict:
    src, dst = rng.sample(CURRENCIES, 2)
    return {"amount": _amount(rng), "from_currency": src, "to_currency": dst}


def _search(rng: random.Random) -> dict:
    return {"query": rng.choice(QUERIES)}


def _event(rng: random.Random) -> dict:
    date = _YEAR_START + datetime.timedelta(days=rng.randrange(365))
    minute = rng.choice([0, 0, 15, 30, 30, 45, rng.randrange(60)])
    time = f"{rng.randint(7, 21):02d}:{minute:02d}"
    return {"title": rng.choice(EVENT_TITLES), "date": date.isoformat(), "time": _maybe(rng, 0.6, time)}


def _music(rng: random.Random) -> dict:
    artist = rng.choice(list(SONGS))
    return {"artist": artist, "song": _maybe(rng, 0.6, rng.choice(SONGS[artist]))}


def _translate(rng: random.Random) -> dict:
    return {"text": rng.choice(PHRASES), "target_language": rng.choice(LANGUAGES)}


SAMPLERS: dict[str, Callable[[random.Random], dict]] = {
    "get_weather": _weather,
    "set_timer": _timer,
    "send_email": _email,
    "convert_currency": _currency,
    "search_web": _search,
    "create_event": _event,
    "play_music": _music,
    "translate_text": _translate,
}


# --- phrasing templates: (shared by train/valid, held out for test) ---------------------------
# Placeholders are argument names; templates are matched to the arguments actually present.
# `{mu}` is "minute"/"minutes" for grammatical agreement, not an argument.

TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "get_weather": (
        [
            "What's the weather in {city}?",
            "What is the weather like in {city} today?",
            "Weather for {city}, please.",
            "Tell me the forecast for {city}.",
            "Is it raining in {city} right now?",
            "Check the weather in {city}.",
            "What's the weather in {city} in {unit}?",
            "Give me the temperature in {city} in {unit}.",
            "Weather in {city}, {unit} please.",
            "How hot is it in {city}? Use {unit}.",
            "Show the forecast for {city} in {unit}.",
        ],
        [
            "I'm heading to {city}, how's the weather there?",
            "{city} weather",
            "Could you check the current temperature in {city} in {unit}?",
            "In {unit}, what's the temperature in {city}?",
        ],
    ),
    "set_timer": (
        [
            "Set a timer for {minutes} {mu}.",
            "Start a {minutes} minute timer.",
            "Can you set a timer for {minutes} {mu}?",
            "Please count down {minutes} {mu}.",
            "Timer {minutes} min",
            "Set a {minutes} minute timer for {label}.",
            "Set a timer called {label} for {minutes} {mu}.",
            "Start a timer for {minutes} {mu} labeled {label}.",
            "Timer for {label}: {minutes} {mu}.",
            "Please time my {label} for {minutes} {mu}.",
        ],
        [
            "I need a countdown of {minutes} {mu}.",
            "{minutes} minute timer please",
            "Could you put a {label} timer on for {minutes} {mu}?",
            "Ping me in {minutes} {mu} for the {label}.",
        ],
    ),
    "send_email": (
        [
            'Send an email to {to} with subject "{subject}" and body "{body}".',
            'Email {to} with the subject "{subject}" saying "{body}".',
            'Please write an email to {to}. Subject: "{subject}". Body: "{body}".',
            'Can you email {to}? Subject "{subject}", message "{body}".',
            'Compose a mail to {to}, subject "{subject}", text "{body}".',
            'Drop {to} an email titled "{subject}" that says "{body}".',
        ],
        [
            'Subject "{subject}", body "{body}": send it to {to}.',
            'I need to tell {to} "{body}" by email, subject "{subject}".',
        ],
    ),
    "convert_currency": (
        [
            "Convert {amount} {from_currency} to {to_currency}.",
            "How much is {amount} {from_currency} in {to_currency}?",
            "What is {amount} {from_currency} worth in {to_currency}?",
            "Please change {amount} {from_currency} into {to_currency}.",
            "{amount} {from_currency} to {to_currency}",
            "Exchange {amount} {from_currency} for {to_currency}, please.",
            "Convert {from_currency} {amount} to {to_currency}.",
        ],
        [
            "How many {to_currency} do I get for {amount} {from_currency}?",
            "I have {amount} {from_currency}, what's that in {to_currency}?",
        ],
    ),
    "search_web": (
        [
            "Search the web for {query}.",
            "Look up {query}.",
            "Google {query}.",
            "Can you search for {query}?",
            "Find information online about {query}.",
            "Please do a web search: {query}",
            "Search: {query}",
            "Search online for {query}, please.",
            "Could you look up {query} on the internet?",
        ],
        [
            "I'd like to read about {query}, find it on the web.",
            "Do an online search on {query} for me.",
        ],
    ),
    "create_event": (
        [
            'Schedule "{title}" on {date} at {time}.',
            "Create an event called {title} on {date} at {time}.",
            "Add {title} to my calendar for {date} at {time}.",
            "Book {title} for {date} at {time}, please.",
            "Calendar: {title}, {date} {time}",
            'Schedule "{title}" on {date}.',
            "Create an event called {title} on {date}.",
            "Add {title} to my calendar for {date}.",
            "Can you put {title} on my calendar on {date}?",
            "New event: {title} on {date}",
        ],
        [
            "On {date} at {time} I have {title}, add it to my calendar.",
            'Could you set up an event for {date} at {time} named "{title}"?',
            "I have {title} on {date}. Put it in the calendar.",
            'Could you set up an event for {date} named "{title}"?',
        ],
    ),
    "play_music": (
        [
            "Play {song} by {artist}.",
            "Put on {song} by {artist}, please.",
            'Can you play "{song}" from {artist}?',
            "I want to hear {song} by {artist}.",
            "Music: {artist}, {song}",
            "Play some {artist}.",
            "Put on {artist}.",
            "I feel like listening to {artist}.",
            "Can you play music by {artist}?",
            "Play something from {artist}, please.",
        ],
        [
            "Start the song {song} by the artist {artist}.",
            "Could you start {song}? It's by {artist}.",
            "Let's hear {artist}.",
            "Any {artist} track is fine, just play it.",
        ],
    ),
    "translate_text": (
        [
            'Translate "{text}" into {target_language}.',
            'How do you say "{text}" in {target_language}?',
            "Translate to {target_language}: {text}",
            'Can you translate "{text}" to {target_language}?',
            'Please put "{text}" into {target_language}.',
            'What is "{text}" in {target_language}?',
            '{target_language} translation of "{text}", please.',
        ],
        [
            'I need this in {target_language}: "{text}"',
            'Say "{text}" in {target_language} for me.',
        ],
    ),
}


def _fields(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


def _templates_for(name: str, present: frozenset[str], held_out: bool) -> list[str]:
    properties = tool_schemas()[name]["properties"]
    pool = TEMPLATES[name][1 if held_out else 0]
    return [t for t in pool if _fields(t) & properties.keys() == present]


def _render(template: str, args: dict) -> str:
    values = {k: str(v) for k, v in args.items()}
    if "minutes" in args:
        values["mu"] = "minute" if args["minutes"] == 1 else "minutes"
    return template.format(**values)


def _record(request: str, name: str, args: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": request},
            {"role": "assistant", "content": call_text(name, args)},
        ]
    }


def _dedupe_key(request: str) -> str:
    return " ".join(request.casefold().split())


def _sample(rng: random.Random, name: str, held_out: bool, seen: set[str]) -> dict:
    for _ in range(1000):
        args = {k: v for k, v in SAMPLERS[name](rng).items() if v is not None}
        request = _render(rng.choice(_templates_for(name, frozenset(args), held_out)), args)
        if _dedupe_key(request) not in seen:
            seen.add(_dedupe_key(request))
            return _record(request, name, args)
    raise RuntimeError(f"entity pools too small for this many unique {name} requests")


def _split(rng: random.Random, n: int, test: bool, seen: set[str]) -> list[dict]:
    records = []
    for i, tool in enumerate(TOOLS):
        count = n // len(TOOLS) + (i < n % len(TOOLS))
        records += [_sample(rng, tool["name"], test and k % 2 == 0, seen) for k in range(count)]
    rng.shuffle(records)
    return records


def generate(seed: int = 0, n_train: int = 600, n_valid: int = 60, n_test: int = 40) -> dict[str, list[dict]]:
    """Train/valid/test records; test is drawn first so it depends only on seed and n_test."""
    rng = random.Random(seed)
    seen: set[str] = set()
    test = _split(rng, n_test, True, seen)
    valid = _split(rng, n_valid, False, seen)
    train = _split(rng, n_train, False, seen)
    return {"train": train, "valid": valid, "test": test}


# --- self-check ---------------------------------------------------------------------------------


def _check_templates() -> None:
    for name, (shared, held) in TEMPLATES.items():
        properties = tool_schemas()[name]["properties"]
        assert not set(shared) & set(held), name
        for template in shared + held:
            assert _fields(template) <= properties.keys() | {"mu"}, template
        required = frozenset(tool_schemas()[name]["required"])
        for optional in [frozenset(), *(frozenset([k]) for k in properties.keys() - required)]:
            for held_out in (False, True):
                assert _templates_for(name, required | optional, held_out), (name, optional, held_out)


def _self_check() -> None:
    for tool in TOOLS:
        Draft202012Validator.check_schema(tool["parameters"])
    _check_templates()
    start = time.perf_counter()
    data = generate(seed=0)
    elapsed = time.perf_counter() - start
    requests: list[str] = []
    for split, records in data.items():
        for record in records:
            answer = record["messages"][2]["content"]
            result = check_call(answer)
            assert result["json_valid"] and result["schema_valid"], answer
            args = json.loads(answer)["arguments"]
            assert answer == call_text(result["name"], args), answer
            requests.append(_dedupe_key(record["messages"][1]["content"]))
        counts = Counter(check_call(r["messages"][2]["content"])["name"] for r in records)
        per_tool = "  ".join(f"{t['name']}={counts[t['name']]}" for t in TOOLS)
        print(f"{split}: {len(records)} records  {per_tool}")
    assert len(requests) == len(set(requests)), "duplicate request"
    assert generate(seed=0) == data, "not deterministic"
    assert check_call('{"name": "get_weather", "arguments": {}}')["schema_valid"] is False
    assert check_call("not json") == {"json_valid": False, "schema_valid": False, "name": None}
    longest = max(len(json.dumps(r, ensure_ascii=False)) for rs in data.values() for r in rs)
    print(f"generated in {elapsed * 1000:.0f} ms; longest record {longest} chars of JSON")
    for record in data["test"][:3]:
        print(f"  user: {record['messages'][1]['content']}\n  assistant: {record['messages'][2]['content']}")


if __name__ == "__main__":
    _self_check()
