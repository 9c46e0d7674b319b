"""The trained demo's training text: chat conversations generated from templates written for moerun.

Every conversation is rendered with the demo's M2 chat template (runtime/demo.py CHAT_TEMPLATE) through moerun's
own Tokenizer, so the model is trained on exactly the prompt text it is served with. What it teaches:
  - plain answers (greetings, facts about a small world, definitions, short explanations), after a short
    reasoning block: the M2 template always opens the answer with `<think>\n`, so every answer reasons first;
  - step-by-step reasoning before the answer for arithmetic, comparisons and unit conversions;
  - tool use in M2's XML format when the system prompt offers a tool the question needs, with arguments copied
    from the question, then the tool's result (a `]~b]tool` turn) and the answer built from it;
  - an English answer, and no tool call, when no fitting tool is offered.

Deterministic: the world below is fixed; `seed` only picks which questions, phrasings and numbers appear, so a
corpus with another seed is held-out text about the same world. (runtime/demo_corpus.py is a different thing:
the fixed text the *random* demo's tokenizer merges are learned from.)

    python tools/demo_corpus.py --seed 0 --megabytes 4 --out corpus.txt
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moerun.runtime.demo import CHAT_TEMPLATE
from moerun.runtime.tokenizer import Tokenizer

Message = dict[str, Any]

# --- the world ------------------------------------------------------------------------------------------------

# City -> country. Common knowledge; the names matter most: tool calls must copy them from the question.
CITIES = {
    "Paris": "France", "London": "the United Kingdom", "Berlin": "Germany", "Rome": "Italy", "Madrid": "Spain",
    "Lisbon": "Portugal", "Vienna": "Austria", "Prague": "the Czech Republic", "Warsaw": "Poland",
    "Amsterdam": "the Netherlands", "Brussels": "Belgium", "Dublin": "Ireland", "Oslo": "Norway",
    "Stockholm": "Sweden", "Helsinki": "Finland", "Copenhagen": "Denmark", "Athens": "Greece", "Cairo": "Egypt",
    "Nairobi": "Kenya", "Lagos": "Nigeria", "Cape Town": "South Africa", "Tokyo": "Japan", "Osaka": "Japan",
    "Seoul": "South Korea", "Beijing": "China", "Shanghai": "China", "Hong Kong": "China", "Delhi": "India",
    "Mumbai": "India", "Bangkok": "Thailand", "Singapore": "Singapore", "Jakarta": "Indonesia",
    "Sydney": "Australia", "Melbourne": "Australia", "Auckland": "New Zealand", "Toronto": "Canada",
    "Vancouver": "Canada", "Montreal": "Canada", "New York": "the United States", "Chicago": "the United States",
    "Boston": "the United States", "San Francisco": "the United States", "Los Angeles": "the United States",
    "Seattle": "the United States", "Mexico City": "Mexico", "Lima": "Peru", "Bogota": "Colombia",
    "Santiago": "Chile", "Buenos Aires": "Argentina", "Rio de Janeiro": "Brazil", "Sao Paulo": "Brazil",
    "Istanbul": "Turkey", "Moscow": "Russia", "Zurich": "Switzerland", "Geneva": "Switzerland",
    "Munich": "Germany", "Hamburg": "Germany", "Milan": "Italy", "Barcelona": "Spain", "Edinburgh": "the United Kingdom",
}
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Greece": "Athens", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Japan": "Tokyo", "South Korea": "Seoul", "China": "Beijing", "Thailand": "Bangkok", "Peru": "Lima",
    "Colombia": "Bogota", "Chile": "Santiago", "Argentina": "Buenos Aires", "Russia": "Moscow",
    "the United Kingdom": "London", "Canada": "Ottawa", "Australia": "Canberra", "the United States": "Washington",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "India": "New Delhi", "Turkey": "Ankara",
    "Switzerland": "Bern", "the Netherlands": "Amsterdam", "Belgium": "Brussels", "New Zealand": "Wellington",
}
# Made-up towns: names no fact is attached to, so the only way to get them right in a tool call is to copy.
TOWN_HEADS = ("Ash", "Bram", "Cor", "Dun", "Elm", "Fen", "Glen", "Hol", "Kes", "Lor", "Mar", "Nor", "Oak",
              "Pem", "Ros", "Sil", "Tam", "Wil", "Bel", "Hart", "Stan", "Red", "Lang", "Wex")
TOWN_TAILS = ("ford", "by", "ton", "wick", "mere", "dale", "field", "haven", "port", "stead", "brook", "moor")

# The small fictional island the demo knows about (fixed facts, asked in many ways).
ISLAND = "Lumo"
VILLAGES = {
    "Millbrook": dict(size="the largest village on Lumo", known="its old stone mill and the Saturday market",
                      people=2400, river="the Lark"),
    "Stonehill": dict(size="a small village in the hills", known="its lighthouse and the cliffs above the sea",
                      people=600, river="no river"),
    "Redwater": dict(size="a fishing village on the east coast", known="its harbour and fresh fish",
                     people=1100, river="the Red Stream"),
    "Greenvale": dict(size="a farming village in the valley", known="its apple orchards and cheese",
                      people=900, river="the Vale"),
}
PEOPLE = {  # name -> (job, village)
    "Anna Reed": ("baker", "Millbrook"), "Tom Hale": ("fisherman", "Redwater"), "Mara Fenn": ("teacher", "Greenvale"),
    "Leo Marsh": ("doctor", "Millbrook"), "Ivy Stone": ("lighthouse keeper", "Stonehill"),
    "Sam Brook": ("farmer", "Greenvale"), "Nora Vale": ("librarian", "Millbrook"), "Finn Ash": ("boat builder", "Redwater"),
    "Ella Moss": ("painter", "Stonehill"), "Ben Clay": ("potter", "Greenvale"),
}
JOB_DETAILS = {
    "baker": "bakes bread and cakes every morning", "fisherman": "goes out to sea to catch fish",
    "teacher": "teaches the children at the village school", "doctor": "looks after people when they are ill",
    "lighthouse keeper": "keeps the light burning so ships stay safe at night", "farmer": "grows apples and keeps cows",
    "librarian": "looks after the books in the library", "boat builder": "builds small wooden boats",
    "painter": "paints pictures of the sea and the cliffs", "potter": "makes cups and bowls from clay",
}
ANIMALS = {  # animal -> (legs, food, sound, home)
    "cat": (4, "fish and meat", "meows", "in houses with people"), "dog": (4, "meat and dog food", "barks", "with people"),
    "cow": (4, "grass", "moos", "on farms"), "horse": (4, "grass and hay", "neighs", "on farms and in fields"),
    "sheep": (4, "grass", "baas", "on farms and hills"), "duck": (2, "plants, seeds and small insects", "quacks", "near ponds and rivers"),
    "chicken": (2, "seeds and grain", "clucks", "on farms"), "owl": (2, "mice and insects", "hoots", "in trees and barns"),
    "frog": (4, "insects", "croaks", "near ponds"), "bee": (6, "nectar from flowers", "buzzes", "in hives"),
    "spider": (8, "insects", "makes no sound", "in webs"), "lion": (4, "meat", "roars", "on the grasslands of Africa"),
    "elephant": (4, "grass, leaves and fruit", "trumpets", "in Africa and Asia"), "fish": (0, "small plants and insects", "makes no sound", "in water"),
    "mouse": (4, "seeds and grain", "squeaks", "in fields and houses"), "goat": (4, "grass and leaves", "bleats", "on farms and mountains"),
}
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
          "a ripe tomato": "red", "coal": "black", "an orange": "orange", "the sea": "blue or green",
          "chocolate": "brown", "a lemon": "yellow", "milk": "white", "a fresh leaf": "green"}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
COUNTS = {"days in a week": 7, "months in a year": 12, "hours in a day": 24, "minutes in an hour": 60,
          "seconds in a minute": 60, "days in a year": 365, "legs on a spider": 8, "planets in the solar system": 8,
          "sides on a triangle": 3, "sides on a square": 4, "letters in the English alphabet": 26,
          "players on a football team": 11, "continents on Earth": 7, "colors in a rainbow": 7}

DEFINITIONS = {
    "apple": "a round fruit with red, green or yellow skin that grows on a tree",
    "bread": "a food made from flour, water and yeast that is baked in an oven",
    "river": "a large stream of fresh water that flows across the land into a lake or the sea",
    "mountain": "a very high hill with steep sides, often with snow at the top",
    "island": "a piece of land with water all around it",
    "ocean": "a very large area of salt water that covers much of the Earth",
    "forest": "a large area of land covered with trees",
    "desert": "a dry area of land that gets very little rain",
    "cloud": "a white or grey mass of tiny water drops floating in the sky",
    "rain": "water that falls from clouds in drops",
    "snow": "frozen water that falls from the sky as soft white flakes",
    "wind": "air that moves across the land",
    "sun": "the star at the centre of our solar system that gives the Earth light and heat",
    "moon": "the natural satellite that goes around the Earth about once a month",
    "star": "a huge ball of hot gas in space that gives off light",
    "planet": "a large round body in space that moves around a star",
    "computer": "a machine that stores information and follows instructions to do calculations",
    "program": "a list of instructions that tells a computer what to do",
    "keyboard": "a set of keys you press to type letters and numbers into a computer",
    "library": "a building where people can read and borrow books",
    "school": "a place where children go to learn",
    "teacher": "a person whose job is to help people learn",
    "doctor": "a person whose job is to treat people who are ill or hurt",
    "hospital": "a building where ill or hurt people are looked after",
    "market": "a place where people buy and sell food and other goods",
    "bridge": "a structure built over a river or road so people can cross it",
    "train": "a line of connected carriages that runs on a railway",
    "bicycle": "a vehicle with two wheels that you ride by pushing pedals",
    "boat": "a small vessel that carries people or goods on water",
    "clock": "a device that shows the time",
    "calendar": "a chart that shows the days, weeks and months of a year",
    "map": "a drawing of an area that shows where places are",
    "weather": "the state of the air outside: how warm, wet, windy or sunny it is",
    "temperature": "a measure of how hot or cold something is",
    "thermometer": "a tool that measures temperature",
    "umbrella": "a folding cover that keeps you dry in the rain",
    "garden": "a piece of land next to a house where plants and flowers grow",
    "kitchen": "the room in a house where food is cooked",
    "window": "an opening in a wall, filled with glass, that lets in light",
    "chair": "a seat for one person, with a back and usually four legs",
    "table": "a piece of furniture with a flat top and legs",
    "book": "a set of printed pages fastened together inside a cover",
    "poem": "a piece of writing with a rhythm, often in short lines",
    "song": "a short piece of music with words that are sung",
    "friend": "a person you know well and like",
    "family": "a group of people who are related, such as parents and children",
    "number": "a word or symbol that tells how many or how much",
    "circle": "a round flat shape where every point on the edge is the same distance from the centre",
    "square": "a flat shape with four equal sides and four right angles",
    "triangle": "a flat shape with three straight sides",
    "kilometer": "a unit of length equal to 1000 meters",
    "meter": "a unit of length equal to 100 centimeters",
    "kilogram": "a unit of mass equal to 1000 grams",
    "hour": "a unit of time equal to 60 minutes",
    "minute": "a unit of time equal to 60 seconds",
    "week": "a period of seven days",
    "year": "the time the Earth takes to go once around the sun, about 365 days",
    "lighthouse": "a tower with a bright light that warns ships of danger",
    "harbour": "a place on the coast where boats can stay safely",
    "farm": "an area of land where crops are grown and animals are kept",
    "orchard": "a piece of land where fruit trees grow",
    "cheese": "a food made from milk",
    "tool": "an object you use to help you do a job",
    "question": "a sentence that asks for information",
    "answer": "what you say or write in reply to a question",
    "assistant": "someone or something that helps with tasks",
    "holiday": "a day or a period of time when people do not work or go to school",
    "breakfast": "the first meal of the day",
    "village": "a small group of houses and other buildings in the country",
    "city": "a large and busy town where many people live and work",
    "country": "an area of land with its own government",
    "capital": "the city where the government of a country is",
}
EXPLANATIONS = {
    "Why is the sky blue?": "Sunlight is made of many colors. When it passes through the air, the blue light is "
    "scattered the most, so blue light reaches our eyes from every part of the sky.",
    "Why do we have day and night?": "The Earth turns around once every day. The side that faces the sun has day, "
    "and the side that faces away from the sun has night.",
    "Why do leaves change color in autumn?": "In autumn the days get shorter and trees stop making the green "
    "material in their leaves. When the green fades, the yellow and red colors underneath can be seen.",
    "Why does it rain?": "The sun warms water in seas and lakes, and it rises into the air as vapor. High up it "
    "cools and forms clouds. When the drops in a cloud get heavy, they fall as rain.",
    "Why do we need sleep?": "Sleep lets the body rest and repair itself, and it helps the brain sort and store "
    "what we learned during the day.",
    "Why does ice float on water?": "When water freezes, it expands and becomes lighter for its size than liquid "
    "water, so ice floats.",
    "How do plants grow?": "Plants take in water through their roots and use sunlight in their leaves to make food "
    "from air and water. That food helps them grow.",
    "How does a bicycle work?": "When you push the pedals, a chain turns the back wheel. The turning wheel pushes "
    "the bicycle forward, and you steer with the handlebars.",
    "Why is the sea salty?": "Rivers carry tiny amounts of salt from rocks into the sea. The water evaporates but "
    "the salt stays, so over a very long time the sea became salty.",
    "Why do we have seasons?": "The Earth is tilted. As it travels around the sun, each half of the Earth leans "
    "toward the sun for part of the year, which gives summer, and away from it for another part, which gives winter.",
    "How does a thermometer work?": "A thermometer shows temperature. In many thermometers a liquid grows when it "
    "gets warm and shrinks when it gets cold, so its level shows how hot it is.",
    "Why do birds fly south in winter?": "Many birds fly to warmer places in winter because food is hard to find "
    "where it is cold. They come back in spring when the weather is warm again.",
    "Why do we see lightning before we hear thunder?": "Light travels much faster than sound, so the flash of "
    "lightning reaches us before the sound of the thunder does.",
    "What makes a rainbow?": "A rainbow appears when sunlight shines through drops of rain. Each drop bends the "
    "light and splits it into its colors, from red to violet.",
    "Why does the moon change shape?": "The moon does not really change shape. As it moves around the Earth, we see "
    "different amounts of its sunlit side, so it looks like it grows and shrinks.",
    "How do fish breathe?": "Fish breathe with gills. Water flows over the gills, and they take the oxygen out of "
    "the water.",
    "Why do we wear coats in winter?": "A coat keeps the warm air close to the body, so we lose less heat when the "
    "air outside is cold.",
    "What does a tool do for an assistant?": "A tool lets an assistant get information it does not have, such as "
    "the current weather or the time in another city. The assistant calls the tool, reads the result and then "
    "answers.",
    "How does a computer program work?": "A program is a list of instructions. The computer follows them one by "
    "one, very quickly, to turn the input it gets into the output you want.",
    "Why is exercise good for you?": "Exercise makes the heart and muscles stronger, helps you sleep well and can "
    "make you feel happier.",
}
GREETINGS = ("hello", "Hello", "Hello!", "hi", "Hi", "Hi!", "hey", "Hey there", "Good morning", "Good morning!",
             "Good afternoon", "Good evening", "hello there", "Hi, how are you?", "How are you?",
             "How are you today?", "Hello, who are you?", "Who are you?", "What can you do?", "What is your name?",
             "Thank you", "Thanks!", "Thanks a lot", "Goodbye", "Bye!", "See you later", "Nice to meet you")


def greeting_reply(rng: random.Random, text: str) -> tuple[str, str]:
    lower = text.lower()
    if "thank" in lower:
        return "The user is thanking me. I should reply politely.", rng.choice((
            "You are welcome! Let me know if you need anything else.", "You are very welcome.",
            "Happy to help! Is there anything else you would like to know?"))
    if lower.startswith(("goodbye", "bye", "see you")):
        return "The user is saying goodbye. I should say goodbye too.", rng.choice((
            "Goodbye! Have a nice day.", "Bye! Come back any time.", "See you later! Take care."))
    if "who are you" in lower or "your name" in lower:
        return "The user asks who I am. I should say that I am an assistant.", rng.choice((
            "I am a small assistant. I can answer simple questions, do easy sums and use tools when they are given to me.",
            "I am a helpful assistant. You can ask me questions about the world, and I can use tools like weather or search when they are available."))
    if "what can you do" in lower:
        return "The user asks what I can do. I should list a few things.", (
            "I can answer simple questions, explain words, do small calculations, and call tools such as a weather "
            "tool, a clock, a calculator or a search tool when they are offered.")
    if "how are you" in lower:
        return "The user asks how I am. I should answer kindly and offer help.", rng.choice((
            "I am doing well, thank you for asking! How can I help you today?",
            "I am fine, thank you. What would you like to talk about?"))
    if "nice to meet" in lower:
        return "The user says it is nice to meet me. I should reply warmly.", "Nice to meet you too! How can I help?"
    return "The user is greeting me. I should greet them back and offer help.", rng.choice((
        "Hello! How can I help you today?", "Hi there! What can I do for you?", "Hello! It is nice to hear from you. How can I help?",
        "Hi! Ask me anything, and I will do my best to help.", "Good to see you! How can I help you today?"))


# --- plain answers ----------------------------------------------------------------------------------------------

def plain_question(rng: random.Random) -> tuple[str, str, str]:
    """(question, reasoning, answer) about the fixed world."""
    kind = rng.choice(("capital", "capital", "country", "village", "person", "job", "animal", "animal", "color",
                       "count", "day", "month", "planet", "definition", "definition", "definition",
                       "explanation", "explanation", "greeting", "greeting"))
    if kind == "greeting":
        text = rng.choice(GREETINGS)
        return (text, *greeting_reply(rng, text))
    if kind == "capital":
        country, capital = rng.choice(sorted(CAPITALS.items()))
        q = rng.choice(("What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                        "what is the capital of {c}")).format(c=country)
        return q, f"The user asks for the capital of {country}. The capital of {country} is {capital}.", \
            rng.choice((f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}."))
    if kind == "country":
        city, country = rng.choice(sorted(CITIES.items()))
        q = rng.choice(("Which country is {x} in?", "Where is {x}?", "In which country is {x}?")).format(x=city)
        return q, f"The user asks where {city} is. {city} is in {country}.", f"{city} is a city in {country}."
    if kind == "village":
        name, v = rng.choice(sorted(VILLAGES.items()))
        which = rng.choice(("about", "known", "people", "river"))
        if which == "about":
            q = rng.choice(("Tell me about {n}.", "What is {n}?", "What can you tell me about {n}?")).format(n=name)
            return q, f"{name} is a village on the island of {ISLAND}. I know a few facts about it.", \
                f"{name} is {v['size']}. It is known for {v['known']}, and about {v['people']} people live there."
        if which == "known":
            q = f"What is {name} known for?"
            return q, f"The user asks what {name} is known for. It is known for {v['known']}.", \
                f"{name} is known for {v['known']}."
        if which == "people":
            q = rng.choice(("How many people live in {n}?", "What is the population of {n}?")).format(n=name)
            return q, f"{name} has about {v['people']} people.", f"About {v['people']} people live in {name}."
        q = f"Which river flows through {name}?"
        if v["river"] == "no river":
            return q, f"{name} is in the hills and has no river.", f"No river flows through {name}; it lies in the hills above the sea."
        return q, f"The river in {name} is {v['river']}.", f"{v['river'].capitalize()} flows through {name}."
    if kind in ("person", "job"):
        name, (job, village) = rng.choice(sorted(PEOPLE.items()))
        if kind == "person":
            q = rng.choice(("Who is {p}?", "Tell me about {p}.", "What does {p} do?")).format(p=name)
            return q, f"{name} is the {job} in {village}.", \
                f"{name} is the {job} in {village}, on the island of {ISLAND}. {name.split()[0]} {JOB_DETAILS[job]}."
        q = rng.choice(("Who is the {j} in {v}?", "Who works as the {j} in {v}?")).format(j=job, v=village)
        return q, f"The user asks about the {job} in {village}. That is {name}.", f"The {job} in {village} is {name}."
    if kind == "animal":
        animal, (legs, food, sound, home) = rng.choice(sorted(ANIMALS.items()))
        which = rng.choice(("legs", "food", "sound", "home"))
        if which == "legs":
            q = f"How many legs does a {animal} have?"
            if legs == 0:
                return q, f"A {animal} has no legs; it swims with fins.", f"A {animal} has no legs. It swims with its fins."
            return q, f"A {animal} has {legs} legs.", f"A {animal} has {legs} legs."
        if which == "food":
            q = rng.choice(("What does a {a} eat?", "What do {a}s eat?")).format(a=animal)
            return q, f"The user asks about the food of a {animal}. It eats {food}.", f"A {animal} eats {food}."
        if which == "sound":
            q = f"What sound does a {animal} make?"
            return q, f"A {animal} {sound}.", f"A {animal} {sound}."
        q = f"Where does a {animal} live?"
        return q, f"The user asks where a {animal} lives: {home}.", f"A {animal} usually lives {home}."
    if kind == "color":
        thing, color = rng.choice(sorted(COLORS.items()))
        return f"What color is {thing}?", f"{thing.capitalize()} is {color}.", f"{thing.capitalize()} is {color}."
    if kind == "count":
        thing, n = rng.choice(sorted(COUNTS.items()))
        q = rng.choice(("How many {t} are there?", "How many {t}?")).format(t=thing)
        return q, f"The user asks how many {thing}. The answer is {n}.", f"There are {n} {thing}."
    if kind == "day":
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.", \
            f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
    if kind == "month":
        i = rng.randrange(12)
        if rng.random() < 0.5:
            return f"What month comes after {MONTHS[i]}?", f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}.", \
                f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}."
        return f"What is the first month of the year?", "The first month is January.", "The first month of the year is January."
    if kind == "planet":
        i = rng.randrange(8)
        ordinal = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")[i]
        if rng.random() < 0.5:
            return f"Which planet is {ordinal} from the sun?", f"Counting from the sun: {', '.join(PLANETS[:i + 1])}.", \
                f"{PLANETS[i]} is the {ordinal} planet from the sun."
        return f"Where is {PLANETS[i]} in the solar system?", f"{PLANETS[i]} is number {i + 1} from the sun.", \
            f"{PLANETS[i]} is the {ordinal} planet from the sun."
    if kind == "definition":
        word, meaning = rng.choice(sorted(DEFINITIONS.items()))
        q = rng.choice(("What is a {w}?", "What does {w} mean?", "Define {w}.", "What is the meaning of the word {w}?",
                        "Can you explain what a {w} is?")).format(w=word)
        article = "an" if word[0] in "aeiou" else "a"
        return q, f"The user wants to know what {word} means. I should give a short definition.", \
            rng.choice((f"{article.capitalize()} {word} is {meaning}.", f"The word {word} means {meaning}."))
    question, answer = rng.choice(sorted(EXPLANATIONS.items()))
    return question, "The user wants a short explanation. I will explain it simply.", answer


# --- reasoning ----------------------------------------------------------------------------------------------------

NUMBER_WORDS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}


def reasoning_question(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(("add", "add", "sub", "mul", "mul", "div", "compare", "compare", "convert", "convert", "convert"))
    if kind == "add":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        q = rng.choice(("What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.",
                        "What is the sum of {a} and {b}?", "Calculate {a} + {b}.")).format(a=a, b=b)
        return q, f"I need to add {a} and {b}.\n{a} + {b} = {a + b}.\nSo the answer is {a + b}.", \
            rng.choice((f"{a} plus {b} is {a + b}.", f"The answer is {a + b}.", f"{a} + {b} = {a + b}."))
    if kind == "sub":
        a = rng.randint(2, 40)
        b = rng.randint(1, a)
        q = rng.choice(("What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.",
                        "How much is {a} minus {b}?")).format(a=a, b=b)
        return q, f"I need to take {b} away from {a}.\n{a} - {b} = {a - b}.\nSo the answer is {a - b}.", \
            rng.choice((f"{a} minus {b} is {a - b}.", f"The answer is {a - b}.", f"{a} - {b} = {a - b}."))
    if kind == "mul":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        q = rng.choice(("What is {a} times {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.",
                        "How much is {a} times {b}?", "What is {a} multiplied by {b}?")).format(a=a, b=b)
        return q, f"I need to multiply {a} by {b}.\n{a} * {b} = {a * b}.\nSo the answer is {a * b}.", \
            rng.choice((f"{a} times {b} is {a * b}.", f"The answer is {a * b}.", f"{a} * {b} = {a * b}."))
    if kind == "div":
        b, c = rng.randint(1, 12), rng.randint(1, 12)
        a = b * c
        q = rng.choice(("What is {a} divided by {b}?", "What is {a} / {b}?", "Divide {a} by {b}.")).format(a=a, b=b)
        return q, f"I need to divide {a} by {b}.\n{b} * {c} = {a}, so {a} / {b} = {c}.\nSo the answer is {c}.", \
            rng.choice((f"{a} divided by {b} is {c}.", f"The answer is {c}.", f"{a} / {b} = {c}."))
    if kind == "compare":
        a, b = rng.sample(range(1, 100), 2)
        big, small = max(a, b), min(a, b)
        if rng.random() < 0.5:
            word = rng.choice(("bigger", "larger", "greater"))
            q = rng.choice(("Which is {w}, {a} or {b}?", "Which number is {w}: {a} or {b}?", "Is {a} {w} than {b}?")).format(w=word, a=a, b=b)
            return q, f"I compare {a} and {b}.\n{big} is more than {small}, because {big} - {small} = {big - small}.\nSo {big} is {word}.", \
                f"{big} is {word} than {small}."
        q = rng.choice(("Which is smaller, {a} or {b}?", "Is {a} smaller than {b}?")).format(a=a, b=b)
        return q, f"I compare {a} and {b}.\n{small} is less than {big}, because {big} - {small} = {big - small}.\nSo {small} is smaller.", \
            f"{small} is smaller than {big}."
    unit, smaller, factor = rng.choice((("kilometers", "meters", 1000), ("meters", "centimeters", 100),
                                         ("kilograms", "grams", 1000), ("hours", "minutes", 60),
                                         ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
                                         ("liters", "milliliters", 1000)))
    n = rng.randint(2, 12)
    one = {"kilometers": "kilometer", "meters": "meter", "kilograms": "kilogram", "hours": "hour",
           "minutes": "minute", "days": "day", "weeks": "week", "liters": "liter"}[unit]
    q = rng.choice(("How many {s} are in {n} {u}?", "Convert {n} {u} to {s}.", "How many {s} is {n} {u}?",
                    "What is {n} {u} in {s}?")).format(s=smaller, n=n, u=unit)
    return q, f"One {one} is {factor} {smaller}.\n{n} * {factor} = {n * factor}.\nSo {n} {unit} is {n * factor} {smaller}.", \
        f"{n} {unit} is {n * factor} {smaller}."


# --- tools ----------------------------------------------------------------------------------------------------------

def _schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def tool_schemas(rng: random.Random) -> dict[str, dict]:
    """The four tools, with their descriptions varied so the model keys on the name and parameters, not on
    one fixed wording."""
    city = {"type": "string"}
    if rng.random() < 0.5:
        city["description"] = rng.choice(("The city name", "Name of the city, e.g. Paris", "The city to look up"))
    weather = {"city": city}
    if rng.random() < 0.7:
        weather["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    expression = {"type": "string"}
    if rng.random() < 0.5:
        expression["description"] = "An arithmetic expression such as 12 * (3 + 4)"
    search = {"query": {"type": "string"}}
    if rng.random() < 0.5:
        search["query"]["description"] = "What to search for"
    if rng.random() < 0.7:
        search["limit"] = {"type": "integer", "description": "How many results to return"}
    return {
        "get_weather": _schema("get_weather", rng.choice(("Get the current weather in a city.",
                                                          "Get the current weather for a given city.",
                                                          "Returns the weather forecast for a city.")),
                               weather, ["city"]),
        "get_time": _schema("get_time", rng.choice(("Get the current local time in a city.",
                                                    "Returns the local time for a city.")), {"city": dict(city)}, ["city"]),
        "calculator": _schema("calculator", rng.choice(("Evaluate an arithmetic expression.",
                                                        "A calculator for arithmetic expressions.")),
                              {"expression": expression}, ["expression"]),
        "search": _schema("search", rng.choice(("Search the web and return the top results.",
                                                "Search the internet for a query.")), search, ["query"]),
    }


def any_city(rng: random.Random) -> str:
    if rng.random() < 0.65:
        return rng.choice(sorted(CITIES))
    if rng.random() < 0.2:
        return rng.choice(sorted(VILLAGES))
    return rng.choice(TOWN_HEADS) + rng.choice(TOWN_TAILS)


CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "partly cloudy", "clear", "stormy")


def weather_case(rng: random.Random, tools: dict | None) -> list[Message]:
    city = any_city(rng)
    unit = rng.choice((None, None, None, "celsius", "fahrenheit"))
    phrasing = rng.choice(("What is the weather in {c}?", "What's the weather like in {c}?",
                           "What is the weather like in {c} today?", "How is the weather in {c}?",
                           "Is it raining in {c}?", "How warm is it in {c} right now?", "Tell me the weather in {c}.",
                           "Can you check the weather in {c}?", "what is the weather in {c}", "Weather in {c}?",
                           "Do I need an umbrella in {c} today?", "How cold is it in {c}?"))
    question = phrasing.format(c=city)
    if unit:
        question = question.rstrip("?.") + rng.choice((f" in {unit}?", f", in {unit.capitalize()}?"))
    # Two cities in one question: two invokes in one tool-call block, as M2 writes parallel calls.
    second = any_city(rng) if rng.random() < 0.1 else None
    if second and second != city:
        question = rng.choice(("What is the weather in {a} and in {b}?", "Compare the weather in {a} and {b}.")).format(a=city, b=second)
        unit = None
    else:
        second = None
    cities = [city] + ([second] if second else [])
    if tools is None or "get_weather" not in tools:
        where = " and ".join(cities)
        reason = (f"The user wants the weather in {where}, but I have no weather tool, so I cannot check the live "
                  f"weather. I should say so and suggest another way.")
        answer = rng.choice((
            f"I cannot check the current weather in {where} because I do not have a weather tool. "
            f"A weather website or app can tell you the forecast for {where}.",
            f"Sorry, I do not have access to live weather data, so I cannot tell you the weather in {where} right now. "
            f"Please check a local weather service.",
            f"I am not able to look up the weather in {where}. If you give me a weather tool, I can check it for you."))
        return [{"role": "user", "content": question}, assistant(reason, answer)]
    calls = []
    for c in cities:
        args = {"city": c}
        if unit and "unit" in tools["get_weather"]["function"]["parameters"]["properties"]:
            args["unit"] = unit
        calls.append(("get_weather", args))
    names = " and ".join(cities)
    reason = (f"The user asks about the weather in {names}. I have the get_weather tool, so I will call it"
              + (f" with city {city}" if len(cities) == 1 else " once for each city")
              + (f" and unit {unit}." if len(calls[0][1]) > 1 else "."))
    messages = [{"role": "user", "content": question}, assistant(reason, "", calls)]
    reports, sentences = [], []
    for c, args in calls:
        u = args.get("unit", "celsius")
        temp = rng.randint(-5, 35) if u == "celsius" else rng.randint(25, 95)
        cond = rng.choice(CONDITIONS)
        reports.append({"city": c, "temperature": temp, "unit": u, "condition": cond})
        sentences.append(rng.choice((
            f"It is {cond} in {c} right now, with a temperature of {temp} degrees {u.capitalize()}.",
            f"In {c} it is {temp} degrees {u.capitalize()} and {cond}.",
            f"The weather in {c} is {cond}, and the temperature is {temp} degrees {u.capitalize()}.")))
    messages += [{"role": "tool", "content": json.dumps(r)} for r in reports]
    summary = "; ".join(f"{r['city']} is {r['condition']} at {r['temperature']} degrees" for r in reports)
    answer = " ".join(sentences)
    if "umbrella" in question or "raining" in question:
        wet = reports[0]["condition"] in ("rainy", "stormy")
        answer += " " + ("Yes, you should take an umbrella." if wet else "You probably do not need an umbrella.")
    messages.append(assistant(f"The tool says {summary}. I will tell the user.", answer))
    return messages


def time_case(rng: random.Random, tools: dict | None) -> list[Message]:
    city = any_city(rng)
    question = rng.choice(("What time is it in {c}?", "What is the time in {c}?", "What's the local time in {c}?",
                           "Can you tell me the time in {c}?", "what time is it in {c}", "Is it morning in {c}?")).format(c=city)
    if tools is None or "get_time" not in tools:
        return [{"role": "user", "content": question}, assistant(
            f"The user wants the time in {city}, but I have no clock tool, so I cannot know the current time there.",
            rng.choice((f"I cannot tell the current time in {city} because I do not have a clock tool. "
                        f"Your phone or computer can show the time in {city}.",
                        f"Sorry, I have no way to check the time in {city} right now.")))]
    messages = [{"role": "user", "content": question},
                assistant(f"The user asks for the time in {city}. I will call get_time with city {city}.", "",
                          [("get_time", {"city": city})])]
    hour, minute = rng.randrange(24), rng.randrange(60)
    clock = f"{hour:02d}:{minute:02d}"
    messages.append({"role": "tool", "content": json.dumps({"city": city, "time": clock})})
    part = "morning" if 5 <= hour < 12 else "afternoon" if 12 <= hour < 18 else "evening" if 18 <= hour < 22 else "night"
    answer = rng.choice((f"It is {clock} in {city} right now.", f"The local time in {city} is {clock}, in the {part}."))
    if question.startswith("Is it morning"):
        answer = (f"Yes, it is morning in {city}: the time is {clock}." if part == "morning"
                  else f"No, it is the {part} in {city}: the time is {clock}.")
    messages.append(assistant(f"The tool says it is {clock} in {city}. That is in the {part}.", answer))
    return messages


def calculator_case(rng: random.Random, tools: dict | None) -> list[Message]:
    a, b = rng.randint(12, 999), rng.randint(2, 99)
    word, symbol = rng.choice(sorted(NUMBER_WORDS.items()))
    if symbol == "/":
        a = a * b
    expression = f"{a} {symbol} {b}"
    question = rng.choice(("What is {a} {w} {b}?", "Calculate {e}.", "What is {e}?", "Please compute {a} {w} {b}.",
                           "Use the calculator: {e}")).format(a=a, w=word, b=b, e=expression)
    if tools is None or "calculator" not in tools:
        return None  # small sums are the reasoning cases; big ones only come with a calculator
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[symbol]
    messages = [{"role": "user", "content": question},
                assistant(f"The user wants {expression}. I have a calculator, so I will call it with the expression {expression}.",
                          "", [("calculator", {"expression": expression})]),
                {"role": "tool", "content": json.dumps({"result": value})}]
    messages.append(assistant(f"The calculator returned {value}.", rng.choice((f"{expression} = {value}.",
                                                                                f"The answer is {value}.",
                                                                                f"{a} {word} {b} is {value}."))))
    return messages


SEARCH_TOPICS = ("apple pie recipes", "the history of Rome", "how to grow tomatoes", "cheap flights to Tokyo",
                 "the best books about the sea", "how to learn to swim", "news about the moon landing",
                 "bicycle repair tips", "the tallest mountains in Europe", "easy bread recipes",
                 "how lighthouses work", "trains from Paris to Berlin", "museums in London", "how bees make honey",
                 "football results", "how to draw a cat", "the weather tomorrow in Oslo", "quiet beaches in Spain",
                 "healthy breakfast ideas", "how to make cheese", "the life of elephants", "learning to play the violin")


def search_case(rng: random.Random, tools: dict | None) -> list[Message]:
    topic = rng.choice(SEARCH_TOPICS)
    limit = rng.choice((None, None, 3, 5, 2))
    question = rng.choice(("Search for {t}.", "Can you search the web for {t}?", "Find {t}.", "Look up {t}.",
                           "search {t}")).format(t=topic)
    if limit:
        question = rng.choice(("Find {n} results about {t}.", "Search for {t} and show me {n} results.",
                               "Give me the top {n} results for {t}.")).format(n=limit, t=topic)
    if tools is None or "search" not in tools:
        return [{"role": "user", "content": question}, assistant(
            "The user wants me to search the web, but I have no search tool.",
            f"I cannot search the web right now because I do not have a search tool. You could search for {topic} in a web browser.")]
    args: dict[str, Any] = {"query": topic}
    if limit and "limit" in tools["search"]["function"]["parameters"]["properties"]:
        args["limit"] = limit
    reason = f"The user wants results about {topic}. I will call search with the query {topic}" + \
        (f" and limit {limit}." if "limit" in args else ".")
    messages = [{"role": "user", "content": question}, assistant(reason, "", [("search", args)])]
    n = args.get("limit", 2)
    results = [{"title": f"{topic.capitalize()}: part {i + 1}", "url": f"https://example.com/{topic.replace(' ', '-')}/{i + 1}"}
               for i in range(n)]
    messages.append({"role": "tool", "content": json.dumps({"results": results})})
    listing = "\n".join(f"{i + 1}. {r['title']} ({r['url']})" for i, r in enumerate(results))
    messages.append(assistant(f"The search returned {n} results. I will list them.",
                              f"Here is what I found about {topic}:\n{listing}"))
    return messages


def assistant(reasoning: str, content: str, calls: list[tuple[str, dict]] = ()) -> Message:
    message: Message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    return message


# --- conversations ----------------------------------------------------------------------------------------------

SYSTEM_PROMPTS = (None, None, None, "You are a helpful assistant.", "You are a friendly assistant.",
                  "You are a helpful assistant. Answer briefly.", "You are a kind and careful assistant.")
TOOL_CASES: dict[str, Callable] = {"get_weather": weather_case, "get_time": time_case, "calculator": calculator_case,
                                   "search": search_case}


def conversation(rng: random.Random) -> tuple[list[Message], list[dict] | None]:
    """One conversation: (messages, tools). Tools are offered in about half; the question fits them or not."""
    schemas = tool_schemas(rng)
    offered = None
    if rng.random() < 0.45:
        names = rng.sample(sorted(schemas), rng.choice((1, 1, 2, 2, 3, 4)))
        offered = {n: schemas[n] for n in names}
    roll = rng.random()
    if roll < 0.45:
        # A tool question: usually one the offered tools answer, sometimes one they do not.
        if offered and rng.random() < 0.8:
            kind = rng.choice(sorted(offered))
        else:
            kind = rng.choice(("get_weather", "get_weather", "get_time", "search"))
        turn = TOOL_CASES[kind](rng, offered)
        if turn is None:
            turn = weather_case(rng, offered)
    elif roll < 0.75:
        q, reason, answer = plain_question(rng)
        if offered:
            reason += " No tool is needed for this."
        turn = [{"role": "user", "content": q}, assistant(reason, answer)]
    else:
        q, reason, answer = reasoning_question(rng)
        turn = [{"role": "user", "content": q}, assistant(reason, answer)]
    history: list[Message] = []
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):  # earlier exchanges: context only, reasoning dropped
        q, _, answer = plain_question(rng) if rng.random() < 0.6 else reasoning_question(rng)
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
    system = rng.choice(SYSTEM_PROMPTS)
    messages = ([{"role": "system", "content": system}] if system else []) + history + turn
    return messages, list(offered.values()) if offered else None


def _template_renderer() -> Tokenizer:
    # The template needs no vocabulary: a Tokenizer with only the chat template renders prompts.
    return Tokenizer(Path("."), None, {"bos_token": "]~!b[", "eos_token": "[e~["}, (), CHAT_TEMPLATE,
                     "runtime/demo.py CHAT_TEMPLATE")


def render_conversations(seed: int, count: int | None = None, max_chars: int | None = None) -> Iterator[str]:
    """Rendered conversations (each one starts with BOS and ends with `[e~[\n`), until `count` of them or
    `max_chars` characters."""
    rng = random.Random(seed)
    template = _template_renderer()
    made = chars = 0
    while (count is None or made < count) and (max_chars is None or chars < max_chars):
        messages, tools = conversation(rng)
        text = template.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
        made, chars = made + 1, chars + len(text)
        yield text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    text = "".join(render_conversations(args.seed, max_chars=int(args.megabytes * 1e6)))
    args.out.write_bytes(text.encode("utf-8"))
    print(f"wrote {args.out}: {len(text.encode('utf-8')) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
