"""The fixed English text the demo tokenizer's BPE merges are learned from.

Written for moerun. It mixes plain prose, chat-style turns, numbers, code and a little JSON so the learned merges
cover what a chat prompt with tools contains. Changing one character changes the demo tokenizer: bump
demo.DEMO_VERSION when you edit it.
"""

CORPUS = """\
The little harbour town woke up before the sun. Fishermen walked down to the boats, and the baker opened the
shop on the corner of the square. A cat sat on the warm stones by the door and watched the people go by.
Every morning the same bell rang from the old tower, and every morning the children ran to school when they
heard it. The sea was calm, the sky was clear, and the wind came from the west.

In the afternoon the market filled with voices. People sold apples, bread, cheese, fish and flowers. An old
man played the violin near the fountain, and a small group of tourists stopped to listen. When the song
ended they clapped, and he bowed and smiled. Then he started another one, slower and softer than the first.

The weather report for tomorrow says rain in the morning and sun in the afternoon. The temperature will be
between 12 and 18 degrees, with a light wind from the north. On Saturday the weather will be warmer, around
21 degrees, and there is no rain in the forecast until Tuesday.

User: Can you tell me how far it is from the station to the museum?
Assistant: The museum is about 2 kilometres from the station. You can walk there in 25 minutes, or take the
number 7 bus, which stops right in front of the entrance. The museum is open from 9 in the morning until 6 in
the evening, and it is closed on Mondays.

User: What is the capital of France, and how many people live there?
Assistant: The capital of France is Paris. About 2.1 million people live in the city itself, and more than 12
million live in the wider region around it.

User: Please write a short poem about the sea.
Assistant: The sea is grey, the sea is blue, it keeps the sky and gives it back to you. It sings at night and
sleeps at noon, and dances slowly with the moon.

A system is a set of parts that work together. The user of a system does not need to know how every part
works; the user only needs to know what the system does and how to ask it for help. A good tool does one job
and does it well. When a tool returns a response, the assistant reads the response and decides what to do
next. Sometimes it calls another tool, and sometimes it answers the question directly.

Let me think about this step by step. First, I need to find the numbers. Then I need to add them together.
The first number is 14 and the second number is 28, so the sum is 42. I think the answer is 42. Let me check
it again: 14 plus 28 is 42. Yes, that is correct, so the final answer is 42.

def add(a, b):
    return a + b

def greet(name):
    print("Hello, " + name + "!")

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

{"name": "get_weather", "description": "Get the current weather for a city.", "parameters": {"type": "object",
"properties": {"city": {"type": "string", "description": "The name of the city"}, "unit": {"type": "string",
"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}

{"name": "search", "description": "Search the web and return the top results.", "parameters": {"type":
"object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}}

The weather in Paris is sunny and 21 degrees. The weather in London is cloudy and 16 degrees. The weather in
Berlin is rainy and 14 degrees. The weather in Rome is hot and 29 degrees.

Once upon a time there was a girl who lived in a house at the edge of a forest. She liked to read books, and
she read them everywhere: in the garden, in the kitchen, and under the big tree behind the house. One day she
found a book that had no title and no name on the cover. When she opened it, the pages were empty, but when
she started to write, the words she wrote began to move and the story began to tell itself.

The train leaves at half past eight and arrives at ten to eleven. Please be on time, because the next train
is not until the afternoon. Tickets can be bought at the station or online, and children under six travel
for free. If you have any questions, ask the staff at the information desk; they are happy to help.

Thank you for your message. I have read it carefully and I will answer your questions one by one. The first
question was about the price, which is 30 euros per person. The second question was about the time, and the
answer is that we start at 10 o'clock. The third question was about the place, and we will meet in front of
the main entrance of the library.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 99 100 128 256 512 1000 2024.
"""
