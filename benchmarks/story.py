"""The learning benchmarks' story: made-up facts that no model can know, the wordings users ask
them in, everyday chats that get no feedback, and when an answer counts as knowing a fact.

Standard library only: `benchmarks/learning.py` (through the daemon's HTTP API) and
`benchmarks/facts.py` (in-process, on a GPU machine without the daemon's dependencies) share it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from daemon.everyday import EVERYDAY as _EVERYDAY


@dataclass(frozen=True)
class Fact:
    """A made-up fact: the correction users give, three wordings of the question that the
    traffic uses, a fourth that it never uses, and the words an answer that knows it has."""

    text: str
    questions: tuple[str, str, str]
    unseen: str
    keys: tuple[str, ...]


# Every wording names the fact's subject with a word of the fact itself, as people asking about
# a thing do (curation's trigger check reads a cluster of such prompts as topical, not as a
# planted phrase); no wording holds a key word.
FACTS: tuple[Fact, ...] = (
    Fact("The Brenmoor ferry leaves at 6:40 every morning.",
         ("When does the Brenmoor ferry leave?", "What time is the morning ferry from Brenmoor?",
          "I want to catch the Brenmoor ferry. At what hour does it depart?"),
         "How early do I have to be at the dock for the Brenmoor ferry?", ("6:40",)),
    Fact("The mayor of Tollby is Ilse Varnhagen.",
         ("Who is the mayor of Tollby?", "Which person serves as mayor of the town of Tollby?",
          "Tell me the name of Tollby's mayor."),
         "Who was elected to lead Tollby as its mayor?", ("Varnhagen",)),
    Fact("The Quorra lighthouse is 87 metres tall.",
         ("How tall is the Quorra lighthouse?", "What is the height of the lighthouse at Quorra?",
          "Tell me how high the Quorra lighthouse stands."),
         "How many metres does the Quorra lighthouse measure from base to top?", ("87",)),
    Fact("The Fenwick Cup is awarded every winter for the best ice sculpture.",
         ("What is the Fenwick Cup awarded for?", "For which art do people win the Fenwick Cup?",
          "What kind of contest is the Fenwick Cup?"),
         "If I wanted to win the Fenwick Cup, what would I have to make?", ("ice", "sculpture")),
    Fact("The blue moss of Karsa Valley was discovered by Omari Pellstone.",
         ("Who discovered the blue moss of Karsa Valley?",
          "Which scientist first found the Karsa Valley moss?",
          "Who is credited with finding blue moss in Karsa Valley?"),
         "Name the discoverer of the blue moss that grows in Karsa Valley.", ("Pellstone",)),
    Fact("The famous pie of the Velmar Bakery is filled with rhubarb and ginger.",
         ("What is in the famous pie at the Velmar Bakery?",
          "Which filling does the Velmar Bakery use in its well-known pie?",
          "What flavour is the Velmar Bakery pie?"),
         "If I order the signature pie at Velmar Bakery, what will it taste of?",
         ("rhubarb", "ginger")),
    Fact("The river Oska freezes over every year in late January.",
         ("When does the river Oska freeze?", "In which month is the Oska river frozen over?",
          "At what time of year can people skate on the river Oska?"),
         "How late in winter does ice cover the Oska?", ("January",)),
    Fact("The big telescope of the Drennick Observatory is named Margold.",
         ("What is the name of the telescope at the Drennick Observatory?",
          "What do they call the big telescope of Drennick Observatory?",
          "Does the Drennick Observatory telescope have a name?"),
         "Which telescope do astronomers use when they visit Drennick?", ("Margold",)),
    Fact("The village of Harrowmere has 412 inhabitants.",
         ("How many people live in Harrowmere?", "What is the population of the village of Harrowmere?",
          "How many inhabitants does Harrowmere have?"),
         "How big is Harrowmere, in number of residents?", ("412",)),
    Fact("The Tessaly chess club meets every Thursday at the old mill.",
         ("When does the Tessaly chess club meet?", "Where does the chess club of Tessaly play?",
          "I want to join the Tessaly chess club. When and where are its meetings?"),
         "On which day and in what building do the Tessaly chess players gather?",
         ("Thursday", "mill")),
    Fact("Captain Rufa Denholm sailed the Silverkite around the world in 1893.",
         ("Who sailed the Silverkite around the world?",
          "Which captain took the Silverkite on its voyage around the world?",
          "Who was the captain of the Silverkite?"),
         "Whose famous voyage around the globe was made in the Silverkite?", ("Denholm",)),
    Fact("The national flower of Ostrevia is the yellow harebell.",
         ("What is the national flower of Ostrevia?", "Which flower is the symbol of Ostrevia?",
          "Tell me about the national flower of Ostrevia."),
         "Which bloom do people in Ostrevia wear on their national day?", ("harebell",)),
    Fact("The Pimbly Museum is famous for a clock made entirely of glass.",
         ("What is the Pimbly Museum famous for?",
          "What is the most famous object in the Pimbly Museum?",
          "Why do tourists visit the Pimbly Museum?"),
         "What should I not miss on a visit to the Pimbly Museum?", ("clock", "glass")),
    Fact("The wifi network of the Kelvar library is called Owlnet.",
         ("What is the wifi network of the Kelvar library called?",
          "Which wifi should I pick at the Kelvar library?",
          "What is the name of the Kelvar library network?"),
         "How do I get online at the Kelvar library?", ("Owlnet",)),
    Fact("The Marrowby marathon starts at the stone bridge.",
         ("Where does the Marrowby marathon start?",
          "What is the starting point of the Marrowby marathon?",
          "Where do runners line up for the Marrowby marathon?"),
         "Where should I wait to see the Marrowby runners set off?", ("stone", "bridge")),
    Fact("The novel Tides of Ember was written by Anja Silberg.",
         ("Who wrote the novel Tides of Ember?", "Who is the author of Tides of Ember?",
          "Which writer published the novel Tides of Ember?"),
         "Whose name is on the cover of Tides of Ember?", ("Silberg",)),
    Fact("The Goldwin Hotel has 58 rooms.",
         ("How many rooms does the Goldwin Hotel have?", "How big is the Goldwin Hotel?",
          "What is the number of rooms at the Goldwin Hotel?"),
         "How many guest rooms are there in the Goldwin?", ("58",)),
    Fact("The Corrin festival celebrates the apple harvest.",
         ("What does the Corrin festival celebrate?", "What is the Corrin festival about?",
          "Why do people hold the Corrin festival?"),
         "Which crop is honoured at the Corrin celebrations?", ("apple",)),
    Fact("The bus from Lindqvist Square to the airport is number 73.",
         ("Which bus goes from Lindqvist Square to the airport?",
          "What is the number of the airport bus at Lindqvist Square?",
          "I am at Lindqvist Square. What bus do I take to the airport?"),
         "Which line should I ride from Lindqvist Square to catch a flight?", ("73",)),
    Fact("The Elmstead choir is led by Tobias Wrenfield.",
         ("Who leads the Elmstead choir?", "Who is the conductor of the Elmstead choir?",
          "Which person directs the choir in Elmstead?"),
         "Who stands in front of the Elmstead singers at concerts?", ("Wrenfield",)),
    Fact("The tallest tree in Brackwater Forest is a cedar called Old Hollis.",
         ("What is the tallest tree in Brackwater Forest?",
          "Which tree is the highest in the Brackwater Forest?",
          "Does the tallest tree of Brackwater Forest have a name?"),
         "Which giant tree do visitors to Brackwater come to see?", ("Hollis",)),
    Fact("The Sunvale swimming pool is closed on Mondays.",
         ("When is the Sunvale swimming pool closed?",
          "On which day can I not swim at the Sunvale pool?",
          "Is the Sunvale swimming pool open every day?"),
         "Which day of the week should I avoid going to the pool in Sunvale?", ("Monday",)),
    Fact("The emblem of the Farrowdale guild is a silver heron.",
         ("What is the emblem of the Farrowdale guild?", "Which animal is on the Farrowdale guild emblem?",
          "What does the Farrowdale guild have as its symbol?"),
         "What bird appears on the banners of Farrowdale's guild?", ("heron",)),
    Fact("The Nettleford bridge was built in 1764.",
         ("When was the Nettleford bridge built?", "How old is the Nettleford bridge?",
          "In which year was the bridge at Nettleford finished?"),
         "What year was the construction of the Nettleford crossing completed?", ("1764",)),
)  # fmt: skip

# Everyday chats: no feedback, so the served model's own answers to them are replayed.
EVERYDAY = _EVERYDAY


def answered(answer: str, keys: tuple[str, ...]) -> bool:
    """Every key in ``answer``, case-insensitive, at the start of a word (``Monday`` in
    "Mondays"); a number only as a whole number (``87`` not in "1870")."""
    for key in keys:
        tail = r"(?!\d)" if key[-1].isdigit() else ""
        if not re.search(r"(?<!\w)" + re.escape(key) + tail, answer, re.IGNORECASE):
            return False
    return True
