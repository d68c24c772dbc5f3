"""A small grammar of text-rendering prompts: a scene with a surface that carries a quoted text.

`draw_text(rng)` makes the text (1-6 words, title / upper / lower case, digits in about a third),
`draw_prompt(rng, text)` puts it in a scene: signs, t-shirts, book covers, neon, chalkboards,
storefronts, cakes, screens, ... The text is the FIRST double-quoted span of the prompt, which is
what the OCR reward reads as the target (`rewards.ocr.extract_target`); no other part of a prompt
holds a double quote. `rl.prompts.generators` draws from here, removes evaluation prompts and targets and
writes the file. The word lists are ours (written for this project), not taken from any dataset.
"""

from __future__ import annotations

import numpy as np

ADJECTIVES = (
    "Golden", "Silent", "Electric", "Lucky", "Midnight", "Rusty", "Velvet", "Cosmic", "Wild", "Tiny",
    "Brave", "Hidden", "Frozen", "Sunny", "Crimson", "Hollow", "Quiet", "Northern", "Urban", "Secret",
    "Happy", "Little", "Rapid", "Honest", "Salty", "Sweet", "Lazy", "Bright", "Copper", "Iron",
    "Paper", "Wooden", "Marble", "Blue", "Green", "Purple", "Orange", "Humble", "Clever", "Gentle",
)
NOUNS = (
    "Fox", "Harbor", "Lantern", "River", "Garden", "Rocket", "Owl", "Compass", "Meadow", "Anchor",
    "Cactus", "Falcon", "Pepper", "Maple", "Comet", "Tiger", "Island", "Bridge", "Castle", "Engine",
    "Forest", "Kettle", "Ladder", "Mirror", "Orchard", "Pebble", "Pixel", "Puzzle", "Raven", "Saddle",
    "Thunder", "Tulip", "Violin", "Walrus", "Whale", "Willow", "Zebra", "Biscuit", "Noodle", "Pretzel",
    "Canyon", "Glacier", "Penguin", "Teapot", "Acorn", "Badger", "Lemon", "Otter", "Rabbit", "Spoon",
)
BUSINESSES = (
    "Bakery", "Cafe", "Diner", "Books", "Barber Shop", "Pizza", "Bike Repair", "Florist", "Hardware",
    "Records", "Laundry", "Tea House", "Pharmacy", "Gym", "Bistro", "Ramen Bar", "Donuts", "Pet Shop",
    "Print Shop", "Ice Cream",
)
NAMES = (
    "Rosa", "Milo", "Hana", "Omar", "Lena", "Theo", "Ivy", "Kofi", "Nora", "Felix", "Aiko", "Luca",
    "Zara", "Ezra", "Mabel", "Otto", "Priya", "Jonas", "Greta", "Arlo",
)
VERBS = (
    "Stay", "Dream", "Think", "Build", "Grow", "Read", "Shine", "Create", "Explore", "Breathe",
    "Smile", "Run", "Travel", "Laugh", "Listen", "Paint", "Bake", "Dance", "Rest", "Wander",
)
MANNERS = (
    "Big", "Bold", "Local", "Loud", "Slow", "Often", "Together", "Forward", "Kind", "Strong",
    "Curious", "Free", "Fresh", "Early", "Late", "Softly", "Daily", "Brightly",
)
PLACES = (
    "Gate", "Platform", "Room", "Aisle", "Route", "Floor", "Dock", "Lane", "Track", "Locker", "Pier", "Bay",
    "Exit", "Hall",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EVENTS = ("Fest", "Fair", "Marathon", "Expo", "Parade", "Jam", "Cup", "Night", "Market", "Summit")
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _texts(rng: np.random.Generator) -> list[str]:
    """One candidate of every text pattern (the caller picks one), words in title case."""
    adj, adj2, noun, noun2 = _pick(rng, ADJECTIVES), _pick(rng, ADJECTIVES), _pick(rng, NOUNS), _pick(rng, NOUNS)
    name, name2, verb, verb2 = _pick(rng, NAMES), _pick(rng, NAMES), _pick(rng, VERBS), _pick(rng, VERBS)
    manner, manner2, place, event = _pick(rng, MANNERS), _pick(rng, MANNERS), _pick(rng, PLACES), _pick(rng, EVENTS)
    business, day = _pick(rng, BUSINESSES), _pick(rng, DAYS)
    small, number, year = int(rng.integers(2, 10)), int(rng.integers(1, 100)), int(rng.integers(1950, 2040))
    code = f"{_pick(rng, LETTERS)}{int(rng.integers(1, 1000))}"
    return [
        noun,  # 1 word
        f"{adj}{noun}",
        code,
        f"{adj} {noun}",  # 2 words
        f"{place} {number}",
        f"{place} {code}",
        f"{verb} {manner}",
        f"Since {year}",
        f"{noun} {code}",
        f"The {adj} {noun}",  # 3 words
        f"{name}'s {business}",
        f"{noun} {event} {year}",
        f"Class of {year}",
        f"Level {number} Complete",
        f"{name} and {name2}",
        f"Closed on {day}s",
        f"Welcome to {adj} {noun}",  # 4 words
        f"{adj} {noun} {business}",
        f"Open {day} {small} to {small + 3}",
        f"Happy {_ordinal(number)} Birthday {name}",
        f"{verb} {manner} {verb2} {manner2}",
        f"{small} {_plural(noun)} for {number}",
        f"Meet Me at the {noun}",  # 5 words
        f"Do Not Feed the {_plural(noun)}",
        f"Chapter {number} The {adj} {noun}",
        f"The {adj} {noun} of {adj2} {noun2}",  # 6 words
        f"{name} and the {adj} {noun} {code}",
    ]


def draw_text(rng: np.random.Generator) -> str:
    """A target text of 1-6 words: title case (60%), UPPER (25%) or lower (15%)."""
    text = _pick(rng, _texts(rng))
    case = rng.random()
    return text.upper() if case < 0.25 else text.lower() if case < 0.40 else text


SLOTS = {
    "place": (
        "a mountain trail", "a city park", "a seaside village", "a desert highway", "a snowy ski resort",
        "a quiet campground", "an old orchard", "a botanical garden",
    ),
    "table": (
        "a wooden table", "a marble countertop", "a rumpled bed", "a picnic blanket", "a glass desk",
        "a kitchen island", "a bookshop shelf",
    ),
    "light": (
        "in warm afternoon light", "under soft morning light", "lit by a single spotlight",
        "on an overcast day", "at golden hour", "under fluorescent lights", "in the blue light of dusk",
    ),
    "color": (
        "red", "navy", "white", "black", "mustard yellow", "forest green", "pastel pink", "charcoal grey",
        "teal",
    ),
    "lettering": (
        "bold sans-serif letters", "hand-painted letters", "elegant gold script", "chunky block letters",
        "retro serif type", "neat capital letters", "playful bubble letters",
    ),
    "venue": (
        "a late-night diner", "a jazz bar", "a noodle shop", "a motel", "a record store", "an arcade",
        "a tattoo parlor",
    ),
    "street": (
        "a busy downtown street", "a cobblestone lane", "a rainy side street", "a sunny boulevard",
        "a quiet suburban corner", "a crowded market street",
    ),
    "scenery": (
        "rolling green hills", "a turquoise bay", "snow-capped mountains", "a red desert canyon",
        "a misty pine forest", "a sunflower field", "a glittering city skyline",
    ),
    "weather": (
        "under a clear blue sky", "in light rain", "in thick fog", "during a snowfall",
        "with storm clouds gathering", "on a hazy summer day",
    ),
    "wall": (
        "a crumbling brick wall", "a concrete underpass", "a rusty shipping container",
        "the side of a train car", "a wooden fence",
    ),
    "time": (
        "sunrise", "noon", "sunset", "twilight", "night",
    ),
    "detail": (
        "a few math equations erased beside it", "a stick of chalk on the ledge",
        "sunlight falling across the desks", "a globe on the teacher's desk",
        "children's drawings pinned around it",
    ),
    "neon": (
        "pink", "blue", "red", "green", "purple", "orange",
    ),
    "road": (
        "an empty parking lot", "a wide asphalt road", "a bike lane", "a school playground",
        "a rooftop helipad",
    ),
    "genre": (
        "science fiction", "film noir", "romantic comedy", "western", "animated", "horror", "documentary",
    ),
    "vehicle": (
        "a dusty pickup truck", "a vintage convertible", "a yellow taxi", "a camper van",
        "a red motorcycle",
    ),
    "material": (
        "brushed steel", "weathered oak", "frosted glass", "polished brass", "painted tin",
    ),
}

SCENES = (
    'A weathered wooden sign at the entrance of {place} reading "{text}", {light}.',
    'A {color} t-shirt laid flat on {table}, printed with "{text}" in {lettering}.',
    'A hardcover book resting on {table}, its cover titled "{text}" in {lettering}, {light}.',
    'A glowing {neon} neon sign spelling "{text}" on the brick wall of {venue} at night.',
    'A classroom chalkboard with "{text}" written in white chalk, {detail}.',
    'A storefront on {street} with "{text}" painted above the door in {lettering}, {light}.',
    'A ceramic coffee mug on {table} with "{text}" printed on its side, steam rising, {light}.',
    'A vintage travel poster with the headline "{text}" above an illustration of {scenery}.',
    'A green highway sign above the road that says "{text}", {weather}.',
    'A birthday cake on {table} with "{text}" piped across the top in {color} icing.',
    'The words "{text}" written in the wet sand of a beach at {time}, a wave about to reach them.',
    'Colourful graffiti reading "{text}" sprayed across {wall}, {light}.',
    'A huge billboard above {street} advertising "{text}" in {lettering}, {weather}.',
    'A cloth banner strung between two trees with "{text}" stitched on it in {color} thread.',
    'A handwritten cardboard sign held high above a crowd, reading "{text}".',
    'A paper tag tied to a jar of honey on {table}, with "{text}" written in black marker.',
    'A laptop lid covered in stickers, the largest one saying "{text}", {light}.',
    'A {color} sports jersey hanging in a locker room with "{text}" printed across the back.',
    'An airport departure board showing "{text}" in yellow letters, travellers blurred behind it.',
    'A stadium scoreboard lighting up with "{text}" at {time}.',
    'A doormat in front of a {color} front door that says "{text}".',
    'A cereal box on a kitchen counter with the brand name "{text}" in {lettering}.',
    'A poster for the {genre} film "{text}" on a cinema wall, {light}.',
    'A greeting card standing on {table}, its front reading "{text}" in {lettering}.',
    'A whiteboard in an office meeting room with "{text}" written in {color} marker.',
    'A yellow sticky note on a computer monitor that says "{text}".',
    'Large white letters spelling "{text}" painted on {road}, seen from above.',
    'A food truck parked near {place} with "{text}" written along its side in {lettering}.',
    'A plaque of {material} on a stone wall engraved with "{text}", {light}.',
    'A wooden trail marker deep in {scenery} carved with "{text}".',
    'A shop window with "{text}" in gold leaf lettering, reflections of {street} in the glass.',
    'An embroidered patch on a denim jacket that says "{text}", {light}.',
    'A canvas tote bag hanging on a hook, screen-printed with "{text}" in {color} ink.',
    'A chalk menu board outside {venue} with "{text}" written at the top.',
    'A glossy magazine cover on a newsstand with the headline "{text}" in {lettering}.',
    'A baseball cap on {table} embroidered with "{text}" in {color} thread.',
    'A wooden crate at a farmers market stamped with "{text}", {light}.',
    'A retro arcade cabinet whose marquee glows with "{text}" in a dark room.',
    'An old typewriter with a sheet of paper in it that reads "{text}".',
    'A smartphone lying on {table}, its screen showing a message that says "{text}".',
    'A street banner hanging from a lamppost on {street}, announcing "{text}".',
    'A hot air balloon drifting over {scenery} with "{text}" painted on its side.',
    'A bakery box tied with string on {table}, its lid stamped with "{text}".',
    'A subway station wall with tiled letters spelling "{text}", {light}.',
    'A fishing boat in a small harbour with the name "{text}" painted near its bow.',
    'A welcome sign on an easel at a garden party with "{text}" in elegant script, {light}.',
    'A kite flying above {scenery} with "{text}" written across it in {color} letters.',
    'A wine bottle on {table} with a label that reads "{text}" in {lettering}.',
    'A license plate frame on {vehicle} that reads "{text}".',
    'A pizza box on {table} with "{text}" printed on the lid in {color} ink.',
)


def draw_prompt(rng: np.random.Generator, text: str) -> str:
    """`text` placed in a scene; every slot of the scene filled from SLOTS."""
    scene = _pick(rng, SCENES)
    fills = {slot: _pick(rng, options) for slot, options in SLOTS.items() if "{" + slot + "}" in scene}
    return scene.format(text=text, **fills)
