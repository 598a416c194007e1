"""Plain English prose written for this project: filler for passkey haystacks and a share of the default
tokenizer corpus. Original text, shipped with the package, so nothing has to be downloaded."""

PROSE = """\
The river that runs past the old mill is slow in summer and loud in spring. In April the snow on the hills
melts, and for a few weeks the water climbs the stone steps that lead down from the road. Children used to
count the steps that were still dry, and the number became a kind of calendar for the village. When only
three steps showed, the farmers waited before planting; when seven showed, they went out with their seed.

Bread is one of the oldest things people make on purpose. Flour, water, salt and a little yeast are enough,
but the result depends on time more than on anything else. A dough left overnight in a cool room tastes
deeper than one hurried through in an hour, because the yeast and the bacteria that live with it have time
to turn starch into sugar and sugar into the small acids that give a crust its colour and its smell.

A good map leaves things out. The person who draws it decides which roads matter, which hills are worth a
contour line, and which streams are too small to name. Every map is therefore an argument about what a
traveller needs to know. A walking map shows stiles and gates; a road atlas shows petrol stations; a sea
chart shows the depth of the water and the rocks that lie just beneath it, and almost nothing of the land.

The library opened at nine, but the reading room filled long before that with people waiting on the steps.
Some came for the newspapers, which were hung on wooden poles so that they would not be carried away. Others
came for the warmth, or for the quiet, or because they had a question that only an old book could answer.
The librarians knew most of them by name and kept a shelf of requests that had not yet been found.

Clocks were not always accurate, and for a long time they did not need to be. A town kept its own time by the
sun, and noon came a few minutes later in the west than in the east. Railways changed that. A timetable only
works if every station agrees on the hour, so the companies chose a single time for the whole line, and the
towns along it slowly gave up their own noon and set their clocks to the one the trains kept.

In a small garden the most important tool is patience. Seeds come up when the soil is warm enough and not a
day before, and a plant moved too often never settles. Beans climb whatever they are given; tomatoes want
sun and a steady supply of water; lettuce bolts the moment the nights grow short. A gardener learns to read
these habits and to plan around them, which is most of what the craft consists of.

Bridges are built to carry more than they will ever meet. An engineer works out the heaviest load the deck
might see, the strongest wind and the coldest night, and then designs for several times that. The margin is
not waste. It covers the steel that was slightly weaker than its certificate, the bolt that was not quite
tight, and the lorry that was heavier than its driver admitted at the weighbridge.

Learning to count in another language is harder than it looks. The first ten numbers come quickly, but the
rules for the teens and the tens differ from one language to the next, and some languages count in twenties
rather than tens. Adults who are fluent in a second language often still do arithmetic in their first one,
silently, because the habit of reciting times tables is laid down early and is hard to move.

The harbour was busiest an hour before dawn. Boats that had been out all night came in low in the water, and
the buyers walked along the quay with torches, looking at the catch in the boxes and writing numbers on
scraps of paper. By the time the sun was up the best fish had been sold, the ice had been shovelled over
what remained, and the crews were asleep in the cabins or eating breakfast in the cafe by the fish market.

A letter takes longer to write than a message, and that is part of its value. The writer has to decide what
matters before starting, because crossing out looks careless. The reader, in turn, keeps the letter, reads
it twice, and sometimes finds it again years later in a drawer. Whole histories have been written from
letters that their authors never imagined anyone but the recipient would read.

Weather forecasts improved slowly and then quickly. For a century they relied on observers who sent
readings of pressure, wind and temperature by telegraph to a central office, where forecasters drew maps by
hand. Satellites and computers changed the scale of the work. A modern forecast solves equations for the
whole atmosphere at once, many times over with slightly different starting points, and reports how often
the answers agree.

The workshop smelled of oil and sawdust. Along one wall hung the hand tools, each outlined in paint so that a
missing chisel was obvious at a glance. The lathe stood in the middle of the floor, and the bench beneath the
window was kept clear for work that needed good light. Apprentices spent their first month sharpening and
sweeping, and only then were they trusted with wood that someone had paid for.
"""
